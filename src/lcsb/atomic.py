"""One way to write a file so that a crash, a kill or a full disk never leaves a torn one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` writes the content to a temporary name beside `path`; it is fsynced and renamed over
    `path`. On any failure (disk full, Ctrl-C) the temporary file is removed and `path` is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
