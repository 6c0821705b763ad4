"""Test-wide settings and the shared tiny model.

The test models are tiny: a second torch thread only adds synchronisation, which costs seconds on a
busy 2-core machine (a 32x64 linear took 16 ms with two threads under load, 0.05 ms with one), so
every test starts with one thread (a test that changes it for itself restores nothing).
"""

import sys
import zlib
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))   # tests/hf.py and tests/tiny.py import as plain modules

import tiny  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny4(tmp_path_factory) -> Path:
    """The 4-layer tiny Llama with its tokenizer (tests/tiny.py), built once per session."""
    return tiny.shared_model(tmp_path_factory.getbasetemp(), 4)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """tiny.make_chat_data's learnable chat task (train.jsonl, valid.jsonl)."""
    return tiny.make_chat_data(tmp_path_factory.mktemp("chat"))


@pytest.fixture
def seed(request):
    """A different, reproducible seed for every test (from its id)."""
    return zlib.crc32(request.node.nodeid.encode())
