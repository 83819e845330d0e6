"""Run a test body on N gloo ranks (separate processes) and report every rank's failure.

    results = run_on_ranks(2, body, arg1, arg2)   # body(rank, world_size, *args) -> picklable value

`body` must be a module-level function of a test module (it is re-imported in each spawned process).
"""

from __future__ import annotations

import io
import multiprocessing as mp
import os
import traceback

import torch

from tidar_megatron.net import free_port


def _worker(rank, world_size, port, body, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from tidar_megatron.console import quiet_third_party_warnings

    quiet_third_party_warnings()  # as the entry points do: the children's stderr is shown on failure
    try:
        torch.set_num_threads(1)
        result = body(rank, world_size, *args)
        # Plain bytes: tensors put on a queue would travel as shared memory that dies with this process.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report everything, including assertion errors, to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from tidar_megatron.training import distributed

            distributed.destroy()
        except Exception:
            pass


def run_on_ranks(world_size: int, body, *args, timeout: float = 600, env: dict | None = None):
    """`env`: extra environment variables for the ranks only (e.g. TRITON_INTERPRET=1, which must be set
    before triton is first imported)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    # Not daemonic: dist_checkpointing starts writer processes of its own.
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, body, args, queue))
             for r in range(world_size)]
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        for p in procs:
            p.start()  # a spawned child copies os.environ as it is now
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results, errors = {}, {}
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(value), weights_only=False)
            else:
                errors[rank] = value
            if errors:  # a failed rank usually leaves the others blocked in a collective
                break
    except Exception as e:  # queue.Empty on timeout
        errors.setdefault(-1, f"timed out after {timeout}s waiting for ranks ({e!r})")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"{len(errors)} rank(s) failed:\n{report}")
    return [results[r] for r in range(world_size)]
