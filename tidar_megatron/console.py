"""What the entry points print: logging set-up, third-party noise filtered, errors as one line.

Only warnings that tell a user nothing are filtered, each by its message (so a new or a real warning from
the same library still shows), and only from the libraries named below; the project's own warnings are
never filtered.  The known fallbacks (TransformerEngine, NVIDIA apex) are summarised in one line instead
(`accelerator_note`).  The test suite applies the same list (tests/conftest.py), so tests show every
warning that is not on it.
"""

from __future__ import annotations

import builtins
import functools
import importlib.util
import logging
import os
import sys
import time
import warnings

from tidar_megatron.errors import TiDARError

# (category, message prefix as a regex): warnings.warn calls of megatron-core, torch and absl-less envs.
NOISY_WARNINGS = [
    ("UserWarning", r"Transformer Engine and Apex are not installed"),
    ("UserWarning", r"Apex is not installed"),
    ("UserWarning", r"absl\.logging is not installed"),
    ("UserWarning", r"MimoModelConfig is experimental"),
    ("UserWarning", r"full scope is deprecated"),
    # megatron-core's advice to TE users whenever the attention core is recomputed, whatever the backend
    ("UserWarning", r"If you are using transformer_engine as the transformer implementation, the core_attn"),
    # FlexAttention on the CPU runs uncompiled on purpose (compiled on a GPU, model/attention.py)
    ("UserWarning", r"flex_attention called without torch\.compile\(\)"),
    ("UserWarning", r"Could not determine rank from torch\.distributed"),
    ("DeprecationWarning", r"The following imports from `dynamic_context\.py` will be removed"),
    # torch's DCP, used by megatron-core's dist_checkpointing
    ("UserWarning", r"torch\.distributed is disabled, unavailable or uninitialized"),
    ("UserWarning", r"The argument order of load has been changed"),
    ("FutureWarning", r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # torch c10d collectives that megatron-core 0.19 still calls by their old names
    ("FutureWarning", r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    # megatron-core's DDP reads `.grad` of parameters seen through torch function modes (compat/cpu.py)
    ("UserWarning", r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed"),
]

# Log records of megatron-core that are advice to its own developers or about features we do not use.
NOISY_LOG_MESSAGES = (
    "GPTModel IS DEPRECATED",
    "DistributedDataParallel: full_param_layout not provided",
    "MCore's async save is deprecated",
    "No CUDA runtime is found",
)


def quiet_third_party_warnings():
    for category, message in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=getattr(builtins, category))


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(text.startswith(m) for m in NOISY_LOG_MESSAGES)


def setup(level: int = logging.INFO):
    """Logging as the entry points want it (plain messages; megatron's INFO lines off) and the filters."""
    quiet_third_party_warnings()
    logging.basicConfig(level=level, format="%(message)s")
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _DropNoise) for f in handler.filters):
            handler.addFilter(_DropNoise())
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO lines drown the progress
    # torch logs this through its own handler when megatron-core imports cpp_extension without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def accelerator_note() -> str | None:
    """One line naming the optional accelerators that are absent (None when all are there)."""
    missing = [name for name, module in (("TransformerEngine", "transformer_engine"), ("NVIDIA apex", "apex"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return f"optional accelerators not installed: {', '.join(missing)} (megatron-core uses its torch fallbacks)"


class ProgressBar:
    """`label [#####.....] done/total rate ETA` on stderr: redrawn in place on a terminal, otherwise one
    line per tenth of the work (logs stay short)."""

    def __init__(self, label: str, unit: str = "", enabled: bool = True):
        self.label, self.unit, self.enabled = label, unit, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.shown_tenth = -1

    def __call__(self, done: int, total: int):
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        tenth = 10 * done // max(total, 1)
        if not self.tty and tenth == self.shown_tenth and done < total:
            return
        self.shown_tenth = tenth
        bar = "#" * (20 * done // max(total, 1))
        eta = elapsed / done * (total - done) if done else 0.0
        line = (f"{self.label} [{bar:<20}] {done}/{total}{self.unit} {done / max(elapsed, 1e-9):.1f}{self.unit}/s "
                f"ETA {eta:.0f}s")
        end = "\n" if done >= total or not self.tty else ""
        print(("\r\033[K" if self.tty else "") + line, end=end, file=sys.stderr, flush=True)


def error(prog: str, message: str) -> int:
    """Print a user error the one way every subcommand does; returns the exit status (2, as argparse)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def entry_point(prog: str):
    """Decorates a subcommand's `main(argv) -> int`: logging and filters set up, a TiDARError printed as
    `<prog>: error: <message>` with exit status 2, Ctrl-C as `<prog>: interrupted` with 130, a closed stdout pipe (`| head`) quietly with 141.  Any other
    exception is a bug and keeps its traceback."""

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None) -> int:
            setup()
            try:
                return fn(argv) or 0
            except TiDARError as e:
                return error(prog, str(e))
            except KeyboardInterrupt:  # Ctrl-C where nothing is left to save (training saves first)
                print(f"\n{prog}: interrupted", file=sys.stderr)
                return 130
            except BrokenPipeError:  # `... | head`: the reader has all it wanted, as for any Unix tool
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
                return 141

        return main

    return wrap
