"""SHA-256 digests of a checkpoint's files: recorded when it is published, verified before it is loaded.

    <checkpoint>/checksums.sha256     one `<hex digest>  <file>` line per file, `sha256sum`'s format, so
                                      `cd <checkpoint> && sha256sum -c checksums.sha256` checks a copy by hand

torch DCP and megatron-core's dist_checkpointing check no content (a flipped byte inside a tensor loads
silently), so this is ours.  The work is spread over the ranks (`share`): each hashes every world_size-th
file, and checkpoint.py gathers the digests.  Files not named in the manifest are not checked.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MANIFEST = "checksums.sha256"


def digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def files(directory: Path) -> list[str]:
    """Every file under `directory` (relative, sorted) but the manifest: the same list on every rank."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def share(names: list[str], rank: int, world_size: int) -> list[str]:
    return names[rank::world_size]


def write_manifest(directory: Path, digests: dict[str, str]):
    (directory / MANIFEST).write_text("".join(f"{digests[n]}  {n}\n" for n in sorted(digests)))


def read_manifest(directory: Path) -> dict[str, str] | None:
    """{file: digest}, or None for a checkpoint saved without checksums."""
    path = directory / MANIFEST
    if not path.is_file():
        return None
    return {name: hexdigest for hexdigest, name in (line.split("  ", 1) for line in path.read_text().splitlines())}


def mismatched(directory: Path, expected: dict[str, str], names: list[str]) -> list[str]:
    """Those of `names` that are missing or whose digest differs from `expected`'s."""
    return [n for n in names if not (directory / n).is_file() or digest(directory / n) != expected[n]]
