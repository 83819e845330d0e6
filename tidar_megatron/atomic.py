"""Publish a file or directory only when it is complete: write under a temporary name beside it, then
rename.  The one write-then-rename helper of the project (checkpoints, exports, tokenized data, plots)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renamed onto `path` if the block succeeds, removed if not."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")  # keep the suffix: savefig reads it
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sweep_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries `atomic_path` left beside `path` when its writer was killed (no `finally`
    ran); returns them."""
    path = Path(path)
    stale = list(path.parent.glob(f".{glob.escape(path.name)}.tmp*"))
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


def write_atomic(path: str | Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory `tmp` onto `final`; an existing `final` is set aside until the new one is
    in place (and restored if the move fails), then removed."""
    old = final.with_name(f".old.{final.name}.{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output: str | Path):
    """Yields a fresh temporary directory beside `output` that becomes `output` only when the block
    succeeds (replacing an existing one); temporaries left by a killed writer are removed first."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".tmp.{output.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".tmp.{output.name}.{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
