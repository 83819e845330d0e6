"""The pretraining loop: `tidar-megatron train --config <preset> [--section.field value ...]`.

Reads top to bottom: check the config, data, paths and what a resume may change (before any process
group), start process groups, build the trainer, resume or initialise, then step / log / validate /
checkpoint until done, preempted (SIGTERM, SIGUSR1: finish the step, save, exit 0) or interrupted (Ctrl-C:
the same, exit 130; a second Ctrl-C aborts at once).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tidar_megatron import config, console
from tidar_megatron.config import Config
from tidar_megatron.console import entry_point
from tidar_megatron.errors import TiDARError


def train(cfg: Config) -> dict:
    """Run (or resume) the training `cfg` describes on the ranks of this launch; returns the last step's
    metrics, `history` (every step's) and `valid` (the last validation)."""
    # torch and megatron-core load here, not at the top: `train --help` lists every field without them.
    import torch

    from tidar_megatron.training import checkpoint, distributed, preflight
    from tidar_megatron.training.inputs import build_data
    from tidar_megatron.training.metrics import Progress, count_parameters
    from tidar_megatron.training.preemption import Preemption
    from tidar_megatron.training.resume_check import schedule_note
    from tidar_megatron.training.trainer import build_trainer
    from tidar_megatron.training.validation import validate

    # Before any process group starts:
    tokenizer = preflight.check(cfg, distributed.env_world_size())
    checkpoint.check_resumable(cfg)
    device = distributed.initialize(cfg)
    rank0 = torch.distributed.get_rank() == 0
    trainer = build_trainer(cfg, on_gpu=device == "cuda")
    ckpt_dir = Path(cfg.checkpoint.dir)

    resumed = None  # the common state of the checkpoint resumed from
    if cfg.checkpoint.resume == "auto":
        resumed = checkpoint.resume(trainer, ckpt_dir)
    elif cfg.checkpoint.resume != "none":
        resumed = checkpoint.load(trainer, cfg.checkpoint.resume)
    if resumed is None and cfg.checkpoint.init_from:
        checkpoint.load_model_weights(trainer.model, cfg.checkpoint.init_from)
        trainer.optimizer.reload_model_params()  # the fp32 main copies (bf16 runs) must follow the new weights

    progress = Progress(cfg, trainer.step, enabled=rank0)
    progress.start(count_parameters(trainer.model))
    if trainer.step >= cfg.train.train_steps:
        progress.message(f"{ckpt_dir} holds a finished run (step {trainer.step} of {cfg.train.train_steps}): "
                         "nothing to do; to continue it raise --train.train_steps (and choose the schedule: "
                         "--checkpoint.lr_schedule config or checkpoint), or use a new --checkpoint.dir")
        progress.close()
        return {"finished": True, "step": trainer.step, "history": []}
    if rank0 and (note := console.accelerator_note()):
        progress.message(note)
    data_state = (resumed or {}).get("data", {})
    train_iter, valid_factory = build_data(cfg, tokenizer, data_state.get("consumed_samples", 0),
                                           report=progress.message)  # the data summary goes to train.log too
    if resumed is not None:
        progress.message(f"resumed at step {trainer.step} (consumed samples {train_iter.consumed_samples}); "
                         f"{schedule_note(cfg, resumed)}")
    nan_streak, result, last_saved = 0, {}, None
    async_saves = checkpoint.AsyncSaves(Preemption.SIGNALS) if cfg.checkpoint.async_save else None
    preemption = Preemption(announce=rank0)

    def save(wait: bool = False):
        """Periodic saves may finish in the background; the last one before exiting is waited for."""
        nonlocal last_saved
        checkpoint.save(trainer, ckpt_dir, train_iter.state_dict(), cfg.checkpoint.keep_last, async_saves)
        if async_saves is not None and wait:
            async_saves.wait()
        last_saved = trainer.step

    try:
        while trainer.step < cfg.train.train_steps:
            start = time.time()
            micro = [next(train_iter) for _ in range(trainer.num_microbatches)]
            metrics = trainer.train_step(micro)
            if async_saves is not None:
                async_saves.poll()
            if metrics["skipped"]:
                nan_streak += 1
                progress.message(f"step {trainer.step}: non-finite loss or gradients, update skipped "
                                 f"({nan_streak} in a row)")
                if nan_streak > cfg.train.max_nan_skips:  # every rank sees the same broadcast loss
                    if async_saves is not None:
                        async_saves.wait()  # keep the last good checkpoint that is still being written
                    raise TiDARError(f"{nan_streak} consecutive non-finite steps (train.max_nan_skips="
                                     f"{cfg.train.max_nan_skips}); lower train.lr or check the data")
            else:
                nan_streak = 0
            progress.step(trainer.step, metrics, time.time() - start)
            result = metrics
            if valid_factory and cfg.train.eval_interval and trainer.step % cfg.train.eval_interval == 0:
                result["valid"] = validate(trainer, valid_factory(), cfg.train.eval_iters)
                progress.validated(trainer.step, result["valid"])
            exit_now = bool(cfg.train.exit_interval) and trainer.step % cfg.train.exit_interval == 0
            if (stop := preemption.agreed() or ("exit interval" if exit_now else None)) is not None:
                save(wait=True)
                progress.message(f"{stop}: saved step {trainer.step} to {ckpt_dir}; exiting")
                return dict(result, step=trainer.step, stopped_early=stop, history=progress.history)
            if cfg.checkpoint.interval and trainer.step % cfg.checkpoint.interval == 0:
                save()
        if last_saved != trainer.step:
            save()
        if async_saves is not None:
            async_saves.wait()
        progress.message(f"done: step {trainer.step}, checkpoint {ckpt_dir / f'iter_{trainer.step:07d}'}")
        return dict(result, history=progress.history)
    finally:
        preemption.close()
        progress.close()


@entry_point("tidar-megatron train")
def main(argv: list[str] | None = None) -> int:
    """`tidar-megatron train`: parses `--config` and the dotted overrides without importing megatron-core,
    so `--help` (every config field) is instant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: tidar-megatron train [--config PRESET|YAML] [--section.field VALUE ...]\n\n"
              f"{__doc__.strip().splitlines()[0]}\n\nPresets: {', '.join(config.preset_names())} (default tiny)."
              " Every field below can be set in the YAML or overridden on the command line." + config.describe())
        return 0
    preset = "tiny"
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise config.ConfigError("--config needs a preset name or a YAML path")
        preset = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    elif any(a.startswith("--config=") for a in argv):
        preset = next(a for a in argv if a.startswith("--config="))[len("--config="):]
        argv = [a for a in argv if not a.startswith("--config=")]
    cfg = config.load_config(preset, argv)
    from tidar_megatron.training import distributed

    try:
        result = train(cfg)
    finally:
        distributed.destroy()
    return 130 if result.get("stopped_early") == "interrupted" else 0  # the shell's code for Ctrl-C
