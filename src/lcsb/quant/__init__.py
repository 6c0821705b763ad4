"""Compressed base weights: formats (formats.py) and the converted-model store (store.py)."""

from .formats import FORMATS, Dense, Int4, Int8, NF4, Weight, quantize, weight_from_tensors

__all__ = ["FORMATS", "Dense", "Int4", "Int8", "NF4", "Weight", "quantize", "weight_from_tensors"]
