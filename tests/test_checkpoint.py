"""checkpoint.py pieces that need no process group: the async-save wrapper's failure handling and the
choice of checkpoints to resume from.  Saving, loading, resharding and resume run in test_train.py."""

import logging

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from tidar_megatron.training import checkpoint


class _FailingQueue:
    """Stands in for megatron-core's AsyncCallsQueue when a background writer failed on some rank."""

    def maybe_finalize_async_calls(self, blocking=False):
        raise CheckpointException("write failed", {1: (OSError("No space left on device"), None)})


def _failing_saves():
    return checkpoint.AsyncSaves(queue=_FailingQueue())


def test_failed_background_save_warns_and_training_goes_on(caplog):
    with caplog.at_level(logging.WARNING):
        _failing_saves().poll()
    assert "background checkpoint save failed and was not published (rank 1: OSError: No space left" in caplog.text


def test_failed_save_that_is_waited_for_is_an_error():
    with pytest.raises(checkpoint.CheckpointError, match=r"save failed \(rank 1: OSError: No space left"):
        _failing_saves().wait()


def test_resume_candidates_skip_incomplete_checkpoints(tmp_path, caplog):
    for step, complete in ((1, True), (2, True), (3, False)):
        d = tmp_path / f"iter_{step:07d}"
        d.mkdir()
        if complete:
            (d / "metadata.json").write_text("{}")
    (tmp_path / ".tmp.iter_0000004").mkdir()  # a save in progress
    (tmp_path / "latest").write_text("iter_0000003\n")  # names the incomplete one
    with caplog.at_level(logging.WARNING):
        found = checkpoint.find_resumable(tmp_path)
    assert [p.name for p in found] == ["iter_0000002", "iter_0000001"]
    assert "missing or incomplete" in caplog.text
    (tmp_path / "latest").write_text("iter_0000001\n")
    assert [p.name for p in checkpoint.find_resumable(tmp_path)] == ["iter_0000001", "iter_0000002"]


def _publish_without_the_temporary(rank, world_size, directory):
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        checkpoint.publish(directory, "iter_0000005", keep_last=2)
    except checkpoint.CheckpointError as e:
        return str(e)
    finally:
        dist.destroy_process_group()
    return None


def test_a_publish_failure_on_rank_0_is_an_error_on_every_rank(tmp_path):
    """Rank 0 cannot rename (the temporary is missing): both ranks raise instead of rank 1 hanging."""
    from multirank import run_on_ranks

    errors = run_on_ranks(2, _publish_without_the_temporary, tmp_path, timeout=120)
    assert all(e and "could not publish iter_0000005 (FileNotFoundError" in e for e in errors), errors
    assert not (tmp_path / "latest").exists()


def _results_queue_after_preemption_signals(rank, world_size):
    import os
    import signal
    import time

    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    from tidar_megatron.compat.megatron_patches import results_queue_manager

    saves = checkpoint.AsyncSaves((signal.SIGTERM, signal.SIGUSR1))
    manager = results_queue_manager(get_write_results_queue.__module__)
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # what Slurm sends to every process of the step
        os.kill(manager.pid, sig)
    time.sleep(1)
    queue = get_write_results_queue()  # the queue megatron-core's writers will use
    queue.put("written")
    return saves.strategy, manager.is_alive(), queue.get()


def test_async_writers_result_queue_survives_preemption_signals():
    """Slurm signals every process of a job step; the Manager process holding the async writers' result
    queue must outlive SIGTERM/SIGUSR1, or the save the signal asks for fails (a plain Manager dies)."""
    from multirank import run_on_ranks

    strategy, alive, got = run_on_ranks(1, _results_queue_after_preemption_signals, timeout=120)[0]
    assert strategy == "mcore" and alive and got == "written"
