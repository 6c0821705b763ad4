"""One way to write a file, and one to write a folder, so that a crash, a kill or a full disk never leaves
a torn one."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable

from .errors import UserError


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


@contextlib.contextmanager
def new_folder(out: str | Path, overwrite: bool = False):
    """A folder written whole or not at all: yields a temporary folder beside `out` to fill; when the block
    ends, every file in it is fsynced and it takes `out`'s place (an existing `out`, allowed by `overwrite`,
    is set aside and dropped only after the swap). On any failure (an error, Ctrl-C) the temporary folder is
    removed and `out` is as it was."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another output folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.lcsb-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
        if out.exists():
            old = out.parent / f".{out.name}.lcsb-old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
        else:
            tmp.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in `path` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
