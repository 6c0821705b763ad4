"""Test-wide settings.

The test models are tiny: a second torch thread only adds synchronisation, which costs seconds on a
busy 2-core machine (a 32x64 linear took 16 ms with two threads under load, 0.05 ms with one).
"""

import sys
import zlib
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))   # tests/hf.py and tests/tiny.py import as plain modules


@pytest.fixture
def seed(request):
    """A different, reproducible seed for every test (from its id)."""
    return zlib.crc32(request.node.nodeid.encode())
