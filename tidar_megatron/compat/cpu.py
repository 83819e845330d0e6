"""Run megatron-core's real code paths on a machine without CUDA (written against megatron-core 0.19.2).

megatron-core assumes CUDA in about a dozen places (RNG tracker, `torch.cuda.current_device()` buffers,
RoPE, `device="cuda"` literals in schedules and optimizers, `'torch.cuda.FloatTensor'` type asserts in
grad clipping and the distributed optimizer, `torch.cuda.synchronize` in checkpoint saving).  This
module maps exactly those onto the CPU so that the quickstart and the test suite exercise the same
Megatron-core model, DDP, optimizer, schedules and dist_checkpointing as a GPU run, over gloo.

It is switched on by `enable()` only when no CUDA device is present (or --train.device cpu asks for it), logs one
line, and refuses to activate when CUDA is available: nothing here may ever run on a GPU.
"""

from __future__ import annotations

import contextlib
import logging

import megatron.core.tensor_parallel.random as mrandom
import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_ACTIVE = False
_MODE: "_CudaToCpuMode | None" = None


def _to_cpu_device(device):
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites `device="cuda"`, `.cuda()` and `.to("cuda")` to the CPU, and answers `Tensor.type()`
    with the CUDA type name that megatron-core's asserts expect."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to:
            args = tuple(_to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda") else name
        return func(*args, **kwargs)


class _CpuStream:
    """Stands in for torch.cuda.Stream / Event: CPU ops are synchronous, so every wait is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _CpuStream()

    def record(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def enable(reason: str = "no CUDA device found", requested: bool = False) -> bool:
    """Switch the CPU compatibility layer on (idempotent). Returns True if it is active.

    On a machine with CUDA it only runs when the user explicitly asked for the CPU (`requested`), since
    it replaces torch.cuda functions process-wide."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if torch.cuda.is_available() and not requested:
        raise RuntimeError("tidar_megatron.compat.cpu is only enabled without CUDA or with --train.device cpu")
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.current_stream = lambda *a, **k: _CpuStream()
    cuda.default_stream = lambda *a, **k: _CpuStream()
    cuda.Stream = _CpuStream
    cuda.Event = _CpuStream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_allocated = lambda *a, **k: 0
    # The RNG tracker swaps "CUDA" generator states in and out around TP-region dropout and init.
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state

    _MODE = _CudaToCpuMode()
    _MODE.__enter__()
    _ACTIVE = True
    log.warning("tidar_megatron: CPU mode (%s): megatron-core's CUDA calls are mapped to the CPU", reason)
    return True


def maybe_enable(device: str = "auto") -> str:
    """Resolve `device` ('auto' | 'cuda' | 'cpu') and enable CPU mode when it resolves to the CPU."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be one of auto, cuda, cpu; got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but no CUDA device is available; use --train.device cpu")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return "cuda"
    if device == "cpu":
        enable("requested with --train.device cpu", requested=True)
    else:
        enable("no CUDA device found")
    return "cpu"
