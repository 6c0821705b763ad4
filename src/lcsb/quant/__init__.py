"""Compressed base weights: formats (formats.py) and the converted-model store (store.py)."""

from .formats import FORMATS, Dense, Int4, Int8, NF4, Weight, quantize, weight_from_tensors
from .store import CheckpointReader, convert_model, fill_from_store

__all__ = ["FORMATS", "CheckpointReader", "Dense", "Int4", "Int8", "NF4", "Weight", "convert_model",
           "fill_from_store", "quantize", "weight_from_tensors"]
