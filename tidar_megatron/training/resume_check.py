"""What a resumed run may change, checked against the checkpoint's recorded config and schedule.

Two kinds of change are refused with one line naming each field and both values:
- what the checkpoint means (the layout: objective, draft block size, mask token, sequence length; the
  vocabulary; the architecture): its optimizer state and data position belong to that setting.  Training
  the new setting from its weights is a new run: --checkpoint.init_from (a fresh optimizer).
- the learning-rate schedule (steps, lr, min_lr, warm-up, decay style, weight decay), unless the run says
  which one wins, as Megatron-LM's --override-opt_param-scheduler / --use-checkpoint-opt_param-scheduler
  do: --checkpoint.lr_schedule config | checkpoint.  Extending a run (a larger train.train_steps) is such
  a change: with `config` the decay is stretched over the new length, with `checkpoint` the run goes on
  where the old schedule ended (its min_lr).

Schedules are compared as resolved, in the units megatron-core's OptimizerParamScheduler records
(trainer.lr_schedule), so a value spelt another way in the config (a warm-up fraction) compares right.
"""

from __future__ import annotations

from pathlib import Path

from tidar_megatron.config import Config, ConfigError
from tidar_megatron.training.trainer import lr_schedule

# OptimizerParamScheduler.state_dict() key -> the config field that sets it
SCHEDULE_FIELDS = {"lr_decay_steps": "train.train_steps", "max_lr": "train.lr", "min_lr": "train.min_lr",
                   "lr_warmup_steps": "warm-up steps (train.lr_warmup_steps or lr_warmup_fraction)",
                   "lr_decay_style": "train.lr_decay_style",
                   "start_wd": "train.weight_decay"}

MEANING_FIELDS = ("tidar.objective", "tidar.draft_block_size", "tidar.mask_token_id", "train.seq_length",
                  "model.vocab_size", "model.make_vocab_size_divisible_by", "model.num_layers", "model.hidden_size",
                  "model.num_attention_heads", "model.num_query_groups", "model.ffn_hidden_size",
                  "model.kv_channels", "model.normalization", "model.activation", "model.add_qkv_bias",
                  "model.qk_layernorm", "model.tie_embeddings", "model.rope_base")


class ResumeMismatch(ConfigError):
    pass


def _meaning(config: dict) -> dict:
    """The MEANING_FIELDS values of a config dict (`Config.to_dict()`), resolved: the head dim for an unset
    kv_channels; no block size under the AR objective, which has no draft blocks."""
    values = {name: config[s][f] for name in MEANING_FIELDS
              for s, f in [name.split(".")] if f in config.get(s, {})}
    model = config.get("model", {})
    if values.get("model.kv_channels") is None and {"hidden_size", "num_attention_heads"} <= set(model):
        values["model.kv_channels"] = model["hidden_size"] // model["num_attention_heads"]
    if values.get("tidar.objective") == "ar":
        values.pop("tidar.draft_block_size", None)
    return values


def meaning_changes(cfg: Config, saved_config: dict) -> list[tuple[str, object, object]]:
    """(field, checkpoint's value, this config's) for every meaning field that differs."""
    saved, now = _meaning(saved_config or {}), _meaning(cfg.to_dict())
    return [(name, saved[name], now[name]) for name in saved if name in now and saved[name] != now[name]]


def schedule_changes(cfg: Config, saved_schedule: dict) -> list[tuple[str, object, object]]:
    """(field, checkpoint's value, this config's) for every schedule value that differs."""
    now = lr_schedule(cfg.train)
    return [(field, saved_schedule[key], now[key]) for key, field in SCHEDULE_FIELDS.items()
            if key in (saved_schedule or {}) and saved_schedule[key] != now[key]]


def _pairs(changes) -> str:
    return "; ".join(f"{name}: checkpoint {old}, this config {new}" for name, old, new in changes)


def check_common(cfg: Config, common: dict, path: str | Path):
    """Refuse to resume checkpoint `path` (its common state `common`) with `cfg` where it may not."""
    if changed := meaning_changes(cfg, common.get("config")):
        raise ResumeMismatch(
            f"{path} cannot be resumed with this config, which changes what it means ({_pairs(changed)}): keep "
            f"the checkpoint's value(s), or train the new setting from its weights in a new run with a fresh "
            f"optimizer: --checkpoint.init_from {path} --checkpoint.dir <new dir>")
    changed = schedule_changes(cfg, common.get("scheduler"))
    if changed and cfg.checkpoint.lr_schedule == "match":
        raise ResumeMismatch(
            f"{path} was trained with another learning-rate schedule ({_pairs(changed)}): say which one "
            "continues, --checkpoint.lr_schedule checkpoint for the checkpoint's value(s) (Megatron-LM's "
            "--use-checkpoint-opt_param-scheduler) or --checkpoint.lr_schedule config for this config's "
            "(--override-opt_param-scheduler)")


def schedule_note(cfg: Config, common: dict) -> str:
    """One line for the log: which schedule the resumed run follows, and what it differs in."""
    changed = schedule_changes(cfg, common.get("scheduler"))
    if not changed:
        return "learning-rate schedule: as in the checkpoint"
    rule = cfg.checkpoint.lr_schedule
    whose = "this config's" if rule == "config" else "the checkpoint's"
    kept = ", ".join(f"{name} {new if rule == 'config' else old} (not {old if rule == 'config' else new})"
                     for name, old, new in changed)
    return f"learning-rate schedule: {whose} (--checkpoint.lr_schedule {rule}): {kept}"
