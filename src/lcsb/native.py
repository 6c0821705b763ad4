"""Building the compiled parts (quant/dequant.c, alloc.cpp) on first use, and caching them.

A library is compiled with the system compiler the first time it is needed and cached under
$LCSB_CACHE (default: $XDG_CACHE_HOME/lcsb or ~/.cache/lcsb), keyed by the source, the command
line, and this CPU's feature flags, so a shared home directory never hands one machine another's
instructions. The caller decides what a failure means (each part has a pure-Python fallback).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    if os.environ.get("LCSB_CACHE"):
        return Path(os.environ["LCSB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lcsb"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, command: list[str], libs: list[str] = (), extra_key: str = "") -> ctypes.CDLL:
    """Compile `source` with `command` (compiler and flags) followed by the source, `libs` and
    `-o out`, or reuse the cached library, and load it. Raises OSError or SubprocessError."""
    src = source.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join([*command, *libs]).encode(), extra_key.encode(),
                                     platform.machine().encode(), _cpu_flags().encode()])).hexdigest()[:16]
    path = cache_dir() / f"{source.stem}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            subprocess.run([*command, str(source), *libs, "-o", tmp], check=True, capture_output=True, timeout=300)
            os.replace(tmp, path)                 # atomic: a concurrent build never sees half a library
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return ctypes.CDLL(str(path))


def optional(make: Callable[[], ctypes.CDLL], switch: str, what: str, otherwise: str) -> ctypes.CDLL | None:
    """`make()`, or None where the environment variable `switch` is 0 or the build fails; a failure
    warns once: "lcsb: {what} could not be built (why); {otherwise}"."""
    if os.environ.get(switch, "1") == "0":
        return None
    try:
        return make()
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        if isinstance(detail, bytes):
            detail = detail.decode(errors="replace")
        why = f"{e}; {detail.strip()[:200]}" if detail.strip() else str(e)
        warnings.warn(f"lcsb: {what} could not be built ({why}); {otherwise}", RuntimeWarning)
        return None
