"""Compressed base weights: the formats (formats.py, ggml.py) and their compiled kernels."""

from .formats import FORMATS, Dense, Int4, Int8, NF4, Weight, quantize, weight_from_tensors

__all__ = ["FORMATS", "Dense", "Int4", "Int8", "NF4", "Weight", "quantize", "weight_from_tensors"]
