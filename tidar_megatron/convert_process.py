"""Run a conversion in a fresh single-rank Megatron process.

Megatron's parallel state and the CPU compatibility layer (cpu_compat) are process-global, so the conversion
gets a process of its own: the caller (a finished training run, the quickstart, pytest, a notebook) keeps its
state, and the conversion always sees a world of one on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import traceback

from .config import Config, ConfigError
from .convert_mapping import ConvertError


@contextlib.contextmanager
def session():
    """Megatron's parallel state for one CPU rank (what `import_hf_local` / `export_local` need)."""
    from . import distributed

    distributed.initialize(Config())
    try:
        yield
    finally:
        distributed.destroy()


def _child(fn, args, results):
    try:
        with session():
            results.put(("ok", fn(*args)))
    except (ConvertError, ConfigError) as e:
        results.put(("error", str(e)))
    except BaseException:
        results.put(("crash", traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_fresh_process(fn, *args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # A world of one on the CPU, whatever launcher or GPUs the caller has (TE's layers need a GPU).
    env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
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
        raise ConvertError(value)
    if status == "crash":
        raise RuntimeError(f"conversion failed:\n{value}")
    return value
