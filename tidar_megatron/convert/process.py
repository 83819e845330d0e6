"""Run a conversion in a fresh single-rank Megatron process, on a single-rank model.

Megatron's parallel state and the CPU compatibility layer (compat/cpu.py) are process-global, so the
conversion gets a process of its own: the caller (a finished training run, the quickstart, pytest, a
notebook) keeps its state, and the conversion always sees a world of one on the CPU.  One rank is enough
for every layout: dist_checkpointing stores tensors by global shape and reshards on load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import queue
import traceback

from tidar_megatron import console
from tidar_megatron.config import Config, from_dict
from tidar_megatron.errors import TiDARError
from tidar_megatron.net import free_port

# megatron-core and the model are imported inside the functions that run in the spawned process, where
# its parallel state and the CPU layer (compat/cpu.py) start.


@contextlib.contextmanager
def session():
    """Megatron's parallel state for one CPU rank (what `import_hf_local` / `export_local` need)."""
    from tidar_megatron.training import distributed

    distributed.initialize(Config())
    try:
        yield
    finally:
        distributed.destroy()


def single_rank_model(cfg: Config):
    """The TiDARModel of `cfg` at TP=1/PP=1 on the CPU (the weights' shapes do not depend on the layout or
    the attention backend); needs `session()`."""
    from tidar_megatron.model import build_model

    single = from_dict(cfg.to_dict())
    single.model.attention_backend = "local"
    single.parallel = dataclasses.replace(single.parallel, tensor_parallel=1, pipeline_parallel=1,
                                          virtual_pipeline=None, sequence_parallel=False)
    single.train.device, single.train.bf16 = "cpu", False
    return build_model(single, on_gpu=False)[0]


def _child(fn, args, results):
    console.setup()
    logging.getLogger("tidar_megatron.compat.cpu").setLevel(logging.ERROR)  # the caller knows it is on a CPU
    try:
        with session():
            results.put(("ok", fn(*args)))
    except TiDARError as e:
        results.put(("error", (type(e), str(e))))
    except BaseException:
        results.put(("crash", traceback.format_exc()))


def in_fresh_process(fn, *args):
    """fn(*args) in a spawned single-rank CPU process; its TiDARError is re-raised here as the same type."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # A world of one on the CPU, whatever launcher or GPUs the caller has (TE's layers need a GPU).
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               CUDA_VISIBLE_DEVICES="")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        # Not a daemon: dist_checkpointing's writer starts a Manager process, which daemons may not.
        proc = ctx.Process(target=_child, args=(fn, args, results))
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v
    try:
        while True:
            try:
                status, value = results.get(timeout=1)
                break
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"the conversion process died (exit code {proc.exitcode})") from None
    finally:  # on Ctrl-C too: no conversion may outlive its caller
        proc.join(timeout=60)
        if proc.is_alive():
            proc.terminate()
    if status == "error":
        error_type, message = value
        raise error_type(message)
    if status == "crash":
        raise RuntimeError(f"conversion failed:\n{value}")
    return value
