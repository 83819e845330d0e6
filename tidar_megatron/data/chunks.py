"""What every input reader shares: the unit of work (`Chunk`), a bad document (`DocError`) and the error
that stops a run (`InputError`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tidar_megatron.errors import TiDARError


class InputError(TiDARError):
    """A problem with the inputs that stops the run (missing file, missing optional dependency)."""


@dataclass(frozen=True)
class DocError:
    """A bad document at `line` of a text file (from 1) or `row` of a Parquet/Arrow file (from 0, as
    datasets indexes it).  For a JSONL chunk cut mid-file `line` counts from the chunk's start; the caller
    adds the lines of the earlier chunks of that file."""
    path: str
    line: int
    reason: str
    unit: str = "line"

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}" if self.unit == "line" else f"{self.path} row {self.line}"


@dataclass(frozen=True)
class Chunk:
    """A unit of work: a byte range [start, end) of one uncompressed JSONL file (end=-1: to the end), row
    groups / record batches [start, end) of one Parquet / Arrow file, or a run of whole files each of which
    is one document (or whole compressed JSONL files)."""
    paths: tuple[str, ...]
    start: int = 0
    end: int = -1
    disk_bytes: int = 0
    stamps: tuple[tuple[int, int], ...] = field(default=())  # (size, mtime_ns) per path, for resume
