"""Typed run configuration: dataclasses, YAML presets in `configs/`, dotted CLI overrides.

    cfg = load_config("tiny", ["--model.num_layers", "4", "--train.lr", "1e-3"])

A preset is a name in `configs/` (`tiny`, `1p5b`, `8b`) or a path to a YAML file.  Every value is checked
once against its field's type and allowed values; errors name the field and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

ATTENTION_BACKENDS = ("local", "flex", "te", "kernel")
ALIASES = {"init.from": "checkpoint.init_from", "resume": "checkpoint.resume"}


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 192
    kv_channels: int | None = None        # head dim; None = hidden_size / num_attention_heads
    vocab_size: int = 256                 # the tokenizer's vocabulary, without the mask token
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-6
    activation: str = "swiglu"
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    init_method_std: float = 0.02
    attention_backend: str = "local"
    fused_loss: bool = False              # output projection + cross-entropy in chunks (tidar_kernels)
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128

    def __post_init__(self):
        _choice("model.normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _choice("model.activation", self.activation, ("swiglu", "gelu"))
        _choice("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _positive(self, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                  "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"model.num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size must be divisible by model.num_attention_heads "
                              "(or set model.kv_channels)")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class TiDARConfig:
    draft_block_size: int = 16
    mask_token_id: int | None = None      # None = the first id after the tokenizer's vocabulary
    alpha: float = 1.0                    # L = (alpha * L_AR + L_diff) / (1 + alpha)

    def __post_init__(self):
        _positive(self, "draft_block_size")
        if self.alpha < 0:
            raise ConfigError(f"tidar.alpha must be >= 0, got {self.alpha}")


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: int | None = None   # model chunks per pipeline rank (interleaved 1F1B); None: plain 1F1B
    context_parallel: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = True

    def __post_init__(self):
        _positive(self, "tensor_parallel", "pipeline_parallel", "context_parallel")
        if self.context_parallel != 1:
            raise ConfigError("parallel.context_parallel > 1 is not supported: the TiDAR mask does not follow "
                              "context parallelism's load-balanced chunking; use tensor/pipeline parallelism")
        if self.virtual_pipeline is not None and (self.virtual_pipeline < 2 or self.pipeline_parallel < 2):
            raise ConfigError(f"parallel.virtual_pipeline ({self.virtual_pipeline}) needs a value >= 2 and "
                              f"parallel.pipeline_parallel >= 2 (got {self.pipeline_parallel}); unset it for "
                              "plain 1F1B")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")


@dataclass
class TrainConfig:
    seq_length: int = 64                  # clean tokens per sample (the model sees 2x this)
    micro_batch_size: int = 2
    global_batch_size: int = 8
    train_steps: int = 100
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_warmup_steps: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    clip_grad: float = 1.0
    seed: int = 1234
    bf16: bool = False
    device: str = "auto"
    log_interval: int = 10
    eval_interval: int = 100              # steps between validation runs (0 = never)
    eval_iters: int = 4                   # global batches per validation run
    max_nan_skips: int = 5                # consecutive non-finite steps before the run stops
    exit_interval: int = 0                # save and exit when the step is a multiple of this (0 = never)
    peak_tflops: float = 989.0            # per-GPU dense bf16 peak for MFU (H100 SXM)

    def __post_init__(self):
        _choice("train.lr_decay_style", self.lr_decay_style, ("constant", "linear", "cosine", "WSD"))
        _choice("train.device", self.device, ("auto", "cuda", "cpu"))
        _positive(self, "seq_length", "micro_batch_size", "global_batch_size", "train_steps", "log_interval")
        if min(self.eval_interval, self.eval_iters, self.max_nan_skips, self.exit_interval) < 0:
            raise ConfigError("train.eval_interval, eval_iters, max_nan_skips and exit_interval must be >= 0")
        if not 0 <= self.lr_warmup_steps < self.train_steps:
            raise ConfigError(f"train.lr_warmup_steps ({self.lr_warmup_steps}) must be in [0, train.train_steps="
                              f"{self.train_steps})")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be between 0 and train.lr ({self.lr})")


@dataclass
class DataConfig:
    blend: list[str] = field(default_factory=list)   # [weight, prefix, weight, prefix, ...] or [prefix]
    split: str = "98,1,1"
    tokenizer: str | None = None
    loader: str = "megatron"
    cache_dir: str | None = None
    num_workers: int = 0
    eod_mask_loss: bool = False

    def __post_init__(self):
        _choice("data.loader", self.loader, ("megatron", "dali"))


@dataclass
class CheckpointConfig:
    dir: str = "runs/default"
    interval: int = 0                     # steps between saves (0 = only at the end and on preemption)
    keep_last: int = 3
    # Periodic saves written in a background process while training goes on.  A preemption then waits
    # for the save in flight and writes its own: leave time for two saves before the job's limit.
    async_save: bool = False
    resume: str = "auto"                  # auto: newest loadable checkpoint in dir | none | a path
    init_from: str | None = None          # weights only, e.g. a converted Hugging Face model


@dataclass
class LogConfig:
    wandb_mode: str = "offline"
    wandb_project: str = "tidar-megatron"

    def __post_init__(self):
        _choice("log.wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tidar: TiDARConfig = field(default_factory=TiDARConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self):
        if self.tidar.mask_token_id is None:
            self.tidar.mask_token_id = self.model.vocab_size
        if not 0 <= self.tidar.mask_token_id <= self.model.vocab_size:
            raise ConfigError(f"tidar.mask_token_id ({self.tidar.mask_token_id}) must be a token id in "
                              f"[0, model.vocab_size={self.model.vocab_size}] (vocab_size = a new token)")
        if self.padded_vocab_size % self.parallel.tensor_parallel:
            raise ConfigError(f"the padded vocabulary ({self.padded_vocab_size}) must be divisible by "
                              f"parallel.tensor_parallel ({self.parallel.tensor_parallel}): raise "
                              "model.make_vocab_size_divisible_by")

    @property
    def padded_vocab_size(self) -> int:
        """The embedding rows: vocabulary plus the mask token when it is new, padded to a multiple of
        model.make_vocab_size_divisible_by.  Unlike Megatron-LM's padding this does not depend on the TP
        size, so a checkpoint keeps its shapes, and reshards, across layouts."""
        rows = self.model.vocab_size + (self.tidar.mask_token_id == self.model.vocab_size)
        multiple = self.model.make_vocab_size_divisible_by
        return -(-rows // multiple) * multiple

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- loading -------------------------------------------------------------------------------------
def load_config(preset: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset (a name in configs/ or a YAML path) and apply `--section.field value` overrides."""
    path = Path(preset)
    if not path.suffix:
        path = CONFIG_DIR / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"config {preset!r} not found (looked for {path}); presets: {', '.join(names)}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, tidar, parallel, train, data)")
    for key, value in parse_overrides(overrides or []):
        key = ALIASES.get(key, key)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"override --{key}: use --section.field (e.g. --model.num_layers 4)")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"override --{key}: {section} is not a section")
        raw[section][name] = value
    return from_dict(raw, source=str(path))


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """['--a.b', '1', '--c.d=x'] -> [('a.b', 1), ('c.d', 'x')]; values are parsed as YAML scalars."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.field value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value")
        out.append((key, yaml.safe_load(value)))
    return out


def from_dict(raw: dict, source: str = "<dict>") -> Config:
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {sorted(unknown)}; sections: {', '.join(sections)}")
    kwargs = {name: _build(hints[name], raw.get(name) or {}, name, source) for name in sections}
    try:
        return Config(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _build(cls, values: dict, section: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = set(values) - set(names)
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(f'{section}.{u}' for u in sorted(unknown))}; "
                          f"{section} has: {', '.join(names)}")
    coerced = {k: _coerce(v, hints[k], f"{section}.{k}", source) for k, v in values.items()}
    try:
        return cls(**coerced)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def _coerce(value, typ, name: str, source: str):
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X]
        if value is None:
            return None
        typ = next(a for a in args if a is not type(None))
    origin = typing.get_origin(typ)
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, typing.get_args(typ)[0], name, source) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{source}: {name} must be {getattr(typ, '__name__', typ)}, got {value!r}")


def _choice(name: str, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(obj, *names):
    section = type(obj).__name__.replace("Config", "").lower()
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{section}.{n} must be >= 1, got {getattr(obj, n)}")
