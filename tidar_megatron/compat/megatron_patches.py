"""Workarounds for gaps of megatron-core 0.19 (0.19.2 tested) that a TiDAR run hits.

Each function names the gap, where it shows, and what it does; remove it once the pinned megatron-core fixes
the gap (tests/test_checkpoint.py and tests/test_train.py fail without them).

  prepare_optimizer_for_load, unshare_adam_steps
      DistributedOptimizer without apex/TE (torch Adam): loading a checkpoint before the first step, the
      per-parameter Adam `step`, and a `step` tensor shared by every parameter after load (broke exact resume).
  shield_async_results_queue
      async dist_checkpointing keeps its writers' result queue in a Manager process that Slurm's preemption
      signal kills, breaking the save that signal asks for.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
from multiprocessing.managers import SyncManager

import torch

log = logging.getLogger(__name__)


def prepare_optimizer_for_load(optimizer):
    """Work around two gaps of megatron-core 0.19's DistributedOptimizer without apex/TE (torch Adam):
    it cannot describe itself before its first step (state_dict asserts one 'step' value), so give it the
    dummy state it would create itself later in its own load path; and its loaders drop torch Adam's
    per-parameter 'step' tensor (restored separately from the common state) yet then look it up, so mark
    it as absent (None entries are skipped by the copy)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is None:
            continue
        if not opt.optimizer.state:
            init()
        if not getattr(opt, "_tidar_step_patch", False):
            setter = opt._set_main_param_and_optimizer_states
            opt._set_main_param_and_optimizer_states = (
                lambda model_param, tensors, _set=setter: _set(model_param, {"step": None, **tensors}))
            opt._tidar_step_patch = True


def unshare_adam_steps(optimizer):
    """A third gap on the same path: DistributedOptimizer.load_state_dict gives every parameter the *same*
    'step' tensor, which torch Adam then increments in place once per parameter per step, corrupting the
    bias correction after a resume.  Give each parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in getattr(opt, "optimizer", opt).state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()



_shielded_managers: dict = {}  # writer module -> the Manager process started for it (one per process)


def shield_async_results_queue(get_results_queue, signals: tuple):
    """Create the async writers' result queue up front, in a Manager process that ignores `signals`.

    megatron-core (and nvidia-resiliency-ext) create it lazily, at the first async save, in a plain
    Manager, and keep it in their module's `_results_queue`; filling that slot first is the only way to
    give the Manager an initializer."""
    name = get_results_queue.__module__
    if not signals or name in _shielded_managers:
        return
    module = sys.modules[name]
    if getattr(module, "_results_queue", 0) is not None:  # created already, or no such slot here
        log.warning("async checkpointing: the writers' result queue cannot be shielded from %s with this "
                    "version of %s", "/".join(signal.Signals(s).name for s in signals), name)
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=_ignore_signals, initargs=(signals,))
    module._results_queue = manager.Queue()
    _shielded_managers[name] = manager


def results_queue_manager(module_name: str):
    """The shielded Manager process of that writer module (a multiprocessing.Process), None if none."""
    manager = _shielded_managers.get(module_name)
    return manager._process if manager is not None else None


def _ignore_signals(signals):
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
