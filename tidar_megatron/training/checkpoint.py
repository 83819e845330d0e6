"""Checkpoints with megatron-core dist_checkpointing (torch_dist): layout-independent, atomic, resumable.

    <dir>/iter_0000100/      one checkpoint (model, optimizer, scheduler, RNG, data position, step, config)
    <dir>/latest             the name of the newest complete checkpoint
    <dir>/.tmp.iter_...      a save in progress; never read, removed by the next save

A save is written under a temporary name and renamed only when every rank has finished (for an async
save: when every rank's background writer has) and its files' checksums are recorded (checksums.py), then
`latest` is replaced atomically; a checkpoint that is missing its metadata, does not match its checksums or
fails to load is skipped, with a warning, in favour of the previous one.  A config that may not continue a
checkpoint (resume_check.py) is refused instead.
Model and optimizer tensors are sharded by their global shape, so a checkpoint saved at one TP/PP/DP
layout loads at another.
"""

from __future__ import annotations

import logging
import random
import re
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import get_async_strategy
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

# torch's DCP reports read failures as this BaseException subclass, which `except Exception` misses.
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from tidar_megatron.atomic import replace_dir, write_atomic
from tidar_megatron.compat import megatron_patches
from tidar_megatron.errors import TiDARError
from tidar_megatron.training import checksums, resume_check

log = logging.getLogger(__name__)

_ITER = re.compile(r"^iter_(\d{7})$")
# Optimizer state in the canonical per-parameter form, so it reshards across TP, PP and DP.
_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(TiDARError, RuntimeError):
    pass


def _describe(error: BaseException) -> str:
    """One line for a log or error message; torch DCP's CheckpointException gets its ranks' errors."""
    if isinstance(error, DCPCheckpointException):
        return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, (e, _) in sorted(error.failures.items()))
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _rank0() -> bool:
    return torch.distributed.get_rank() == 0


def _model_state(model, prefix_chunks: bool) -> dict:
    chunks = [getattr(m, "module", m) for m in model]
    if not prefix_chunks:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    pp, tp, dp = (parallel_state.get_pipeline_model_parallel_world_size(),
                  parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_data_parallel_world_size())
    ranks = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank(),
             parallel_state.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", state, (pp, tp, dp), ranks, replica_id=0)


def _set_rng_state(state: dict):
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _layout_of(cfg) -> tuple:
    p = cfg.parallel
    world = torch.distributed.get_world_size()
    return (p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline, world)


def _sharded_state(trainer, is_loading: bool, with_rng: bool) -> dict:
    model_state = _model_state(trainer.model, prefix_chunks=len(trainer.model) > 1)
    state = dict(model_state)
    if is_loading:
        megatron_patches.prepare_optimizer_for_load(trainer.optimizer)
    # The nested dict as it is: the chunks' dicts share local names ("decoder.layers.0..."), so merging
    # them would drop all but the last chunk's parameters.
    state["optimizer"] = trainer.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                              metadata=_OPT_METADATA)
    if with_rng:
        state["rng_state"] = _rng_state()
    return state


class AsyncSaves:
    """Checkpoints written by a background process per rank while training goes on (megatron-core's async
    dist_checkpointing: tensors are staged to host memory, then a forked writer saves them).  At most one
    is in flight; it is published (renamed, `latest`) by its finalize step, which every rank reaches
    through `poll()` (each step) or `wait()`.  A save that fails is never published (the next save
    removes its temporary): `poll()` warns and training goes on, `wait()` raises.  Uses
    nvidia-resiliency-ext's writer when installed, as megatron-core recommends, else megatron-core's own
    (the one the tests run)."""

    def __init__(self, shielded_signals=(), queue=None):
        """`shielded_signals`: the preemption signals.  Slurm sends them to every process of a job step,
        and the writers' result queue lives in a multiprocessing Manager process that such a signal would
        kill, breaking the very save the signal asks for; that process ignores them.  `queue`: an
        AsyncCallsQueue to use instead of a new one of megatron-core's."""
        try:
            self.strategy, queue_cls = get_async_strategy("nvrx", "AsyncCallsQueue")
        except ModuleNotFoundError:
            self.strategy, queue_cls = get_async_strategy("mcore", "AsyncCallsQueue")
        self._queue = queue if queue is not None else queue_cls()
        _, get_results_queue = get_async_strategy(self.strategy, "get_write_results_queue")
        megatron_patches.shield_async_results_queue(get_results_queue, tuple(shielded_signals))

    def schedule(self, request):
        self._queue.schedule_async_request(request)

    def poll(self):
        """Publish a finished save, if any (a collective: every rank calls it)."""
        try:
            self._queue.maybe_finalize_async_calls(blocking=False)
        except (Exception, DCPCheckpointException) as e:  # raised on every rank alike by the finalize step
            log.warning("a background checkpoint save failed and was not published (%s); training goes on, "
                        "the next save retries", _describe(e))

    def wait(self):
        """Block until the save in flight (if any) is published; a failure is a CheckpointError."""
        try:
            self._queue.maybe_finalize_async_calls(blocking=True)
        except (Exception, DCPCheckpointException) as e:
            raise CheckpointError(f"a background checkpoint save failed ({_describe(e)}); check the checkpoint "
                                  "directory's free space and permissions") from e


def save(trainer, directory: str | Path, data_state: dict, keep_last: int | None = None,
         async_saves: AsyncSaves | None = None) -> Path:
    """Save `trainer` (all ranks call this) and publish it as `latest` once complete.  With `async_saves`
    this returns once the tensors are staged; the checkpoint appears when `async_saves` finalizes it."""
    directory = Path(directory)
    name = f"iter_{trainer.step:07d}"
    final, tmp = directory / name, directory / f".tmp.{name}"
    if async_saves is not None:
        async_saves.wait()  # one save in flight: the stale-temporary cleanup below must not remove it
    if _rank0():
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(".tmp.iter_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    torch.distributed.barrier()
    state = _sharded_state(trainer, is_loading=False, with_rng=True)
    state.update(scheduler=trainer.scheduler.state_dict(), step=trainer.step, data=data_state,
                 config=trainer.cfg.to_dict(), layout=_layout_of(trainer.cfg))
    publish_step = partial(publish, directory, name, keep_last)
    if async_saves is None:
        dist_checkpointing.save(state, str(tmp))
        publish_step()
    else:
        request = dist_checkpointing.save(state, str(tmp), async_sharded_save=True,
                                          async_strategy=async_saves.strategy)
        request.add_finalize_fn(publish_step)  # runs after dist_checkpointing's own metadata finalize
        async_saves.schedule(request)
    return final


def publish(directory: Path, name: str, keep_last: int | None):
    """Rename the complete temporary to its final name, point `latest` at it, prune older ones.  Rank 0
    does the file work; its outcome is shared, so a failure there is an error on every rank rather than
    the other ranks waiting for it forever."""
    torch.distributed.barrier()
    digests, outcome = _hash_share(directory / f".tmp.{name}"), [""]
    if _rank0():
        try:
            if isinstance(digests, str):
                raise OSError(digests)
            checksums.write_manifest(directory / f".tmp.{name}", digests)
            final = directory / name
            replace_dir(directory / f".tmp.{name}", final)
            _write_latest(directory, name)
            if keep_last:  # prune only older steps: newer ones may belong to a run this one rolled back from
                older = [c for c in list_checkpoints(directory) if c.name < name]
                for old in older[:max(len(older) - (keep_last - 1), 0)]:
                    shutil.rmtree(old, ignore_errors=True)
            log.info("saved %s", final)
        except OSError as e:
            outcome = [_describe(e)]
    torch.distributed.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise CheckpointError(f"{directory}: could not publish {name} ({outcome[0]}); check the directory's "
                              "permissions and free space")


def _hash_share(tmp: Path) -> dict[str, str] | str:
    """Every rank hashes its share of the checkpoint's files; rank 0 gets all digests ({file: digest}), or
    the first rank's error as a string."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        mine = {n: checksums.digest(tmp / n) for n in checksums.share(checksums.files(tmp), rank, world)}
    except OSError as e:
        mine = f"rank {rank}: {_describe(e)}"
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return {}
    errors = [g for g in gathered if isinstance(g, str)]
    return errors[0] if errors else {n: d for g in gathered for n, d in g.items()}


def verify(path: Path):
    """Check `path` against its checksums, each rank its share (a collective); a mismatch on any rank is a
    CheckpointError on every rank, naming the files.  A checkpoint saved without checksums passes."""
    expected = checksums.read_manifest(path)
    if expected is None:
        log.info("%s has no %s (saved before checksums were recorded): not verified", path, checksums.MANIFEST)
        return
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    bad = checksums.mismatched(path, expected, checksums.share(sorted(expected), rank, world))
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, bad)
    bad = sorted(n for g in gathered for n in g)
    if bad:
        raise CheckpointError(f"{path}: {', '.join(bad)} do(es) not match {checksums.MANIFEST} (damaged or "
                              "modified after it was saved)")


def _write_latest(directory: Path, name: str):
    write_atomic(directory / "latest", name + "\n")


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete-looking checkpoints, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _ITER.match(p.name) and (p / "metadata.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def find_resumable(directory: str | Path) -> list[Path]:
    """Candidates to resume from, best first: `latest`, then older checkpoints."""
    directory = Path(directory)
    found = list_checkpoints(directory)[::-1]
    latest = directory / "latest"
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if named in found:
            found.remove(named)
            found.insert(0, named)
        else:
            log.warning("%s names %s, which is missing or incomplete; falling back to older checkpoints",
                        latest, named.name)
    return found


def check_resumable(cfg) -> Path | None:
    """Before any process group starts: refuse a config that may not continue the checkpoint this run would
    resume from (resume_check.ResumeMismatch).  Reads the newest checkpoint whose common state reads, the
    one `resume` starts with (a damaged one it skips has the same config in a run).  Returns its path."""
    c = cfg.checkpoint
    if c.resume == "none":
        return None
    for path in [Path(c.resume)] if c.resume != "auto" else find_resumable(c.dir):
        try:
            common = dist_checkpointing.load_common_state_dict(str(path))
        except (Exception, DCPCheckpointException):
            continue  # resume() reports it and falls back
        resume_check.check_common(cfg, common, path)
        return path
    return None


def load(trainer, path: str | Path) -> dict:
    """Load model, optimizer, scheduler (and RNG when the layout is unchanged) into `trainer` after
    verifying its checksums and that `trainer.cfg` may continue it.  Returns the checkpoint's common state
    (`data`: the data position, `config`, `scheduler`, ...); sets `trainer.step`."""
    path = Path(path)
    verify(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    resume_check.check_common(trainer.cfg, common, path)
    same_layout = tuple(common.get("layout", ())) == _layout_of(trainer.cfg)
    state = _sharded_state(trainer, is_loading=True, with_rng=same_layout)
    loaded = dist_checkpointing.load(state, str(path))
    chunks = [getattr(m, "module", m) for m in trainer.model]
    if len(chunks) == 1:
        chunks[0].load_state_dict(loaded["model"])
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(loaded[f"model{i}"])
    trainer.optimizer.load_state_dict(loaded["optimizer"])
    megatron_patches.unshare_adam_steps(trainer.optimizer)
    trainer.scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        log.warning("%s was saved with another parallel layout; RNG states start fresh", path)
    trainer.step = int(common["step"])
    return common


def resume(trainer, directory: str | Path) -> dict | None:
    """Load the newest loadable checkpoint under `directory` and return its common state (`load`); None when
    there is none.  When there are checkpoints but none loads, stop: silently starting over would discard
    the run."""
    candidates = find_resumable(directory)
    for candidate in candidates:
        try:
            common = load(trainer, candidate)
        except resume_check.ResumeMismatch:
            raise  # the config, not the checkpoint, is wrong: an older checkpoint of the run would not do
        except (Exception, DCPCheckpointException) as e:  # corrupt: warn and fall back to the previous one
            log.warning("could not load %s (%s); trying the previous checkpoint", candidate, _describe(e))
            continue
        log.info("resumed from %s at step %d", candidate, trainer.step)
        return common
    if candidates:
        raise CheckpointError(f"{directory}: none of the checkpoints ({', '.join(c.name for c in candidates)}) "
                              "loads with this config (see the warnings above); fix the config or use "
                              "--checkpoint.resume none with a new --checkpoint.dir")
    return None


_VOCABULARY_HINT = (" (model.vocab_size, tidar.mask_token_id and model.make_vocab_size_divisible_by decide the "
                    "rows: train with the checkpoint's own, e.g. import-hf's config.yaml)")


def check_shapes(path: Path, model, what: str = "this run's config"):
    """Every tensor of the model chunks against its global shape in the checkpoint at `path`: one line on a
    mismatch, naming the tensor and both shapes.  dist_checkpointing itself would load the overlap of a
    smaller tensor silently (e.g. fewer vocabulary rows, the rest left at zero)."""
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for chunk in model:
        for sh in nested_values(getattr(chunk, "module", chunk).sharded_state_dict()):
            if not isinstance(sh, ShardedTensor):  # SwiGLU's fc1 factory: checked by the load itself
                continue
            if sh.key not in saved:
                raise CheckpointError(f"{path}: has no tensor {sh.key}, which {what} implies; the config does "
                                      "not match the weights")
            if tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
                vocabulary = "word_embeddings" in sh.key or "output_layer" in sh.key
                raise CheckpointError(f"{path}: {sh.key} has shape {tuple(saved[sh.key].global_shape)} but {what} "
                                      f"gives {tuple(sh.global_shape)}; the config does not match the weights"
                                      f"{_VOCABULARY_HINT if vocabulary else ''}")


def load_model_weights(model, path: str | Path, what: str = "this run's config"):
    """Initialise model chunks from a checkpoint's weights only (e.g. a converted Hugging Face model).
    Shapes must match the config the model was built from (`what`, in errors) exactly (`check_shapes`)."""
    path = Path(path)
    if not (path / "metadata.json").is_file():
        candidates = find_resumable(path)
        if not candidates:
            raise CheckpointError(f"{path}: no checkpoint found (expected metadata.json or iter_* folders)")
        path = candidates[0]
    check_shapes(path, model, what)
    state = _model_state(model, prefix_chunks=len(model) > 1)
    try:
        loaded = dist_checkpointing.load(state, str(path))
    except (Exception, DCPCheckpointException) as e:
        raise CheckpointError(f"{path}: does not match this model's config ({_describe(e)}); check model.* "
                              "against the checkpoint's config") from None
    chunks = [getattr(m, "module", m) for m in model]
    for i, c in enumerate(chunks):
        c.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    return path
