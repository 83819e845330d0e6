"""Typed run configuration: dataclasses, YAML presets in `configs/`, dotted CLI overrides.

    cfg = load_config("tiny", ["--model.num_layers", "4", "--train.lr", "1e-3"])

A preset is a name in `configs/` (`tiny`, `1p5b`, `8b`) or a path to a YAML file.  Every value is checked
once against its field's type and allowed values; errors name the field, where the value came from (the
YAML file or the command line) and, for a misspelt name, the nearest field.  `describe()` lists every field
with its type, default, allowed values and help: `tidar-megatron train --help`.

The vocabulary is the tokenizer's, as in Megatron-LM: `model.vocab_size` and `tidar.mask_token_id` default
to `data.tokenizer`'s (`resolve_vocabulary`, called before any process group starts); an explicit value is
checked against it.  `model.vocab_size` counts the rows of token ids; a mask token equal to it is one more
row (a new id), any smaller id an existing row: `Config.padded_vocab_size`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from tidar_megatron.errors import TiDARError
from tidar_megatron.hf.rope import RopeError, megatron_problem, normalise
from tidar_megatron.layout import TiDARLayout

ATTENTION_BACKENDS = ("auto", "local", "flex", "te", "kernel")
ALIASES = {"init.from": "checkpoint.init_from", "resume": "checkpoint.resume"}


class ConfigError(TiDARError, ValueError):
    pass


def option(default, help: str, choices: tuple | None = None):
    """A config field with its help text and, optionally, its allowed values (checked on construction)."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


class _Section:
    """Checks every field's allowed values, then the section's own rules (`validate`)."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            allowed = f.metadata.get("choices")
            value = getattr(self, f.name)
            if allowed and value not in allowed:
                raise ConfigError(f"{self.section_name()}.{f.name} must be one of {', '.join(map(str, allowed))}; "
                                  f"got {value!r}")
        self.validate()

    @classmethod
    def section_name(cls) -> str:
        return cls.__name__.replace("Config", "").lower()

    def validate(self):
        pass

    def _positive(self, *names):
        for n in names:
            if getattr(self, n) is not None and getattr(self, n) < 1:
                raise ConfigError(f"{self.section_name()}.{n} must be >= 1, got {getattr(self, n)}")


@dataclass
class ModelConfig(_Section):
    num_layers: int = option(2, "transformer layers")
    hidden_size: int = option(64, "model width")
    num_attention_heads: int = option(4, "query heads")
    num_query_groups: int = option(2, "key/value heads (grouped-query attention)")
    ffn_hidden_size: int = option(192, "MLP width")
    kv_channels: int | None = option(None, "head dim (default: hidden_size / num_attention_heads)")
    vocab_size: int | None = option(None, "vocabulary rows for token ids (default: data.tokenizer's vocabulary)")
    normalization: str = option("RMSNorm", "layer norm kind", ("RMSNorm", "LayerNorm"))
    norm_epsilon: float = option(1e-6, "norm epsilon")
    activation: str = option("swiglu", "MLP activation", ("swiglu", "gelu"))
    add_qkv_bias: bool = option(False, "biases on the q/k/v projections (Qwen2)")
    qk_layernorm: bool = option(False, "RMSNorm of q and k per head (Qwen3)")
    tie_embeddings: bool = option(False, "share the input embedding and the output layer")
    rope_base: float = option(10000.0, "RoPE base (theta)")
    init_method_std: float = option(0.02, "std of the initial weights")
    attention_backend: str = option("auto", "TiDAR attention: auto (kernel on a GPU, local on the CPU), local "
                                    "(dense reference), flex (FlexAttention), te (TransformerEngine bias), kernel "
                                    "(Triton block-sparse)", ATTENTION_BACKENDS)
    fused_loss: bool = option(False, "output projection + cross-entropy in chunks, never the full logits")
    attention_dropout: float = option(0.0, "attention dropout")
    hidden_dropout: float = option(0.0, "hidden dropout")
    make_vocab_size_divisible_by: int = option(128, "pad the embedding rows to a multiple of this")
    recompute_granularity: str | None = option(None, "activation recompute (Megatron-core's): selective "
                                               "(the attention core) or full (whole layers); unset: none",
                                               (None, "selective", "full"))
    recompute_method: str | None = option(None, "with full: uniform (every recompute_num_layers layers form "
                                          "a unit) or block (the first recompute_num_layers layers of each "
                                          "stage); default uniform", (None, "uniform", "block"))
    recompute_num_layers: int | None = option(None, "with full: layers per unit (uniform) or recomputed "
                                              "layers per stage (block); default 1")
    rope_scaling: dict | None = option(None, "RoPE scaling as Hugging Face's rope_parameters: rope_type linear, "
                                       "llama3 or yarn with its fields (import-hf copies it); unset: plain RoPE")
    hf_config: dict | None = option(None, "what export writes back of the Hugging Face source: its config.json "
                                    "and generation_config.json beyond the fields of this section (import-hf fills it)")

    def validate(self):
        self._positive("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                       "vocab_size", "make_vocab_size_divisible_by")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"model.num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError("model.hidden_size must be divisible by model.num_attention_heads "
                              "(or set model.kv_channels)")
        if self.recompute_granularity != "full" and (self.recompute_method or self.recompute_num_layers):
            raise ConfigError("model.recompute_method and model.recompute_num_layers apply to "
                              "model.recompute_granularity full only")
        self._positive("recompute_num_layers")
        try:
            self.rope_scaling = normalise(self.rope_scaling) if self.rope_scaling else None
        except RopeError as e:
            raise ConfigError(f"model.rope_scaling.{e}") from None
        if megatron_problem(self.rope_scaling):
            raise ConfigError(f"model.rope_scaling.{megatron_problem(self.rope_scaling)}")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def attention_backend_on(self, on_gpu: bool) -> str:
        """The backend that runs: `auto` is the Triton kernel on a GPU and the dense reference on the CPU."""
        if self.attention_backend == "auto":
            return "kernel" if on_gpu else "local"
        return self.attention_backend


@dataclass
class TiDARConfig(_Section):
    objective: str = option("tidar", "tidar: the doubled sequence and both losses; ar: the same model as a plain "
                            "causal LM on the clean tokens (the AR baseline)", ("tidar", "ar"))
    draft_block_size: int = option(16, "mask tokens per draft block (B)")
    mask_token_id: int | None = option(None, "the mask token (default: the tokenizer's, else a new id = vocab_size)")
    alpha: float = option(1.0, "loss = (alpha * L_AR + L_diff) / (1 + alpha)")

    def validate(self):
        self._positive("draft_block_size")
        if self.alpha < 0:
            raise ConfigError(f"tidar.alpha must be >= 0, got {self.alpha}")


@dataclass
class ParallelConfig(_Section):
    tensor_parallel: int = option(1, "tensor-parallel size")
    pipeline_parallel: int = option(1, "pipeline-parallel size (1F1B)")
    virtual_pipeline: int | None = option(None, "model chunks per pipeline rank (interleaved 1F1B); unset: 1F1B")
    context_parallel: int = option(1, "context parallelism (not supported: must stay 1)")
    sequence_parallel: bool = option(False, "sequence parallelism (needs TransformerEngine or NVIDIA apex norms)")
    use_distributed_optimizer: bool = option(True, "shard optimizer state over data-parallel ranks")

    def validate(self):
        self._positive("tensor_parallel", "pipeline_parallel", "context_parallel")
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
class TrainConfig(_Section):
    seq_length: int = option(64, "clean tokens per sample (a TiDAR model sees 2x this)")
    micro_batch_size: int = option(2, "samples per micro-batch and data-parallel rank")
    global_batch_size: int = option(8, "samples per optimizer step, all ranks together")
    train_steps: int = option(100, "optimizer steps")
    lr: float = option(3e-4, "peak learning rate")
    min_lr: float = option(3e-5, "final learning rate of the decay")
    lr_warmup_steps: int | None = option(None, "linear warm-up steps (or lr_warmup_fraction; neither: none)")
    lr_warmup_fraction: float | None = option(None, "linear warm-up as a fraction of train_steps "
                                              "(Megatron-LM's --lr-warmup-fraction)")
    lr_decay_style: str = option("cosine", "learning-rate decay", ("constant", "linear", "cosine", "WSD"))
    weight_decay: float = option(0.1, "AdamW weight decay")
    adam_beta1: float = option(0.9, "Adam beta1")
    adam_beta2: float = option(0.95, "Adam beta2")
    clip_grad: float = option(1.0, "gradient-norm clipping")
    seed: int = option(1234, "seed of initialisation, data order and dropout")
    bf16: bool = option(False, "bf16 weights and activations with fp32 main weights (GPU)")
    device: str = option("auto", "auto: CUDA when present; cpu: force the CPU compatibility layer",
                         ("auto", "cuda", "cpu"))
    log_interval: int = option(10, "steps between progress lines")
    eval_interval: int = option(100, "steps between validation runs (0 = never)")
    eval_iters: int = option(4, "global batches per validation run")
    max_nan_skips: int = option(5, "consecutive non-finite steps before the run stops")
    exit_interval: int = option(0, "save and exit when the step is a multiple of this (0 = never)")
    peak_tflops: float = option(989.0, "per-GPU dense bf16 peak for MFU (H100 SXM)")

    def validate(self):
        self._positive("seq_length", "micro_batch_size", "global_batch_size", "train_steps", "log_interval")
        if min(self.eval_interval, self.eval_iters, self.max_nan_skips, self.exit_interval) < 0:
            raise ConfigError("train.eval_interval, eval_iters, max_nan_skips and exit_interval must be >= 0")
        if self.lr_warmup_steps is not None and self.lr_warmup_fraction is not None:
            raise ConfigError(f"train.lr_warmup_steps ({self.lr_warmup_steps}) and train.lr_warmup_fraction "
                              f"({self.lr_warmup_fraction}) are both set; set one (the other to null)")
        if self.lr_warmup_steps is not None and not 0 <= self.lr_warmup_steps < self.train_steps:
            raise ConfigError(f"train.lr_warmup_steps ({self.lr_warmup_steps}) must be in [0, train.train_steps="
                              f"{self.train_steps}); or give train.lr_warmup_fraction")
        if self.lr_warmup_fraction is not None and not 0 <= self.lr_warmup_fraction < 1:
            raise ConfigError(f"train.lr_warmup_fraction ({self.lr_warmup_fraction}) must be in [0, 1)")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must be between 0 and train.lr ({self.lr})")

    @property
    def warmup_steps(self) -> int:
        """The warm-up in steps, whichever way it was given (what the scheduler and resume checks use)."""
        if self.lr_warmup_fraction is not None:
            return int(self.lr_warmup_fraction * self.train_steps)
        return self.lr_warmup_steps or 0


@dataclass
class DataConfig(_Section):
    blend: list[str] = option([], "tokenized .bin/.idx prefixes: weight prefix weight prefix ... (--data.blend 0.7 "
                              "data/a 0.3 data/b) or prefixes only, as Megatron-LM's --data-path")
    blend_file: str | None = option(None, "a file holding the blend (Megatron-LM's --data-args-path), or JSON "
                                    "{train: [...], valid: [...], test: [...]} (--per-split-data-args-path)")
    train_blend: list[str] = option([], "a blend per split instead of data.blend and data.split (Megatron-LM's "
                                    "--train-data-path); with data.valid_blend and data.test_blend")
    valid_blend: list[str] = option([], "the validation blend (with data.train_blend)")
    test_blend: list[str] = option([], "the test blend (with data.train_blend)")
    split: str = option("98,1,1", "train,valid,test proportions of the documents")
    tokenizer: str | None = option(None, "the tokenizer the data was tokenized with (.model file or HF directory)")
    loader: str = option("megatron", "megatron: torch DataLoader; dali: NVIDIA DALI pipeline", ("megatron", "dali"))
    cache_dir: str | None = option(None, "Megatron's dataset index cache (default: <checkpoint.dir>/data_cache)")
    num_workers: int = option(0, "DataLoader worker processes")
    eod_mask_loss: bool = option(False, "do not train on predicting the end-of-document token")
    reset_attention_mask: bool = option(False, "document-level attention: no token attends across an EOD "
                                        "boundary of the packed sequence (Megatron-LM's flag)")
    reset_position_ids: bool = option(False, "positions restart at 0 at every document start (Megatron-LM's)")


@dataclass
class CheckpointConfig(_Section):
    dir: str = option("runs/default", "run directory: checkpoints, train.log, plots")
    interval: int = option(0, "steps between saves (0 = only at the end and on preemption)")
    keep_last: int = option(3, "checkpoints kept")
    # A preemption waits for the save in flight and writes its own: leave time for two saves before the limit.
    async_save: bool = option(False, "write periodic saves in a background process while training goes on")
    resume: str = option("auto", "auto: newest loadable checkpoint in dir | none | a checkpoint path")
    lr_schedule: str = option("match", "on resume, a learning-rate schedule that differs from the checkpoint's: "
                              "match: refuse; config: this config's (Megatron-LM's --override-opt_param-"
                              "scheduler); checkpoint: the checkpoint's (--use-checkpoint-opt_param-scheduler)",
                              ("match", "config", "checkpoint"))
    init_from: str | None = option(None, "initial weights only (e.g. `tidar-megatron import-hf` output)")
    init_required: bool = option(False, "refuse to start without init_from (the continual-pretraining "
                                 "presets: the paper's recipe starts from an AR checkpoint)")


@dataclass
class LogConfig(_Section):
    wandb_mode: str = option("offline", "wandb logging", ("offline", "online", "disabled"))
    wandb_project: str = option("tidar-megatron", "wandb project")


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
        if self.model.vocab_size is None:
            return  # taken from the tokenizer before training starts (resolve_vocabulary)
        if self.tidar.mask_token_id is None and not self.data.tokenizer:
            self.tidar.mask_token_id = self.model.vocab_size  # a new id after the vocabulary
        self._check_vocabulary()

    def _check_vocabulary(self):
        mask = self.tidar.mask_token_id
        if mask is not None and not 0 <= mask <= self.model.vocab_size:
            raise ConfigError(f"tidar.mask_token_id ({mask}) must be a token id in [0, model.vocab_size="
                              f"{self.model.vocab_size}] (vocab_size = a new token)")
        if mask is not None and self.padded_vocab_size % self.parallel.tensor_parallel:
            raise ConfigError(f"the padded vocabulary ({self.padded_vocab_size}) must be divisible by "
                              f"parallel.tensor_parallel ({self.parallel.tensor_parallel}): raise "
                              "model.make_vocab_size_divisible_by")

    @property
    def padded_vocab_size(self) -> int:
        """The embedding rows: vocabulary plus the mask token when it is new, padded to a multiple of
        model.make_vocab_size_divisible_by.  Unlike Megatron-LM's padding this does not depend on the TP
        size, so a checkpoint keeps its shapes, and reshards, across layouts."""
        if self.model.vocab_size is None or self.tidar.mask_token_id is None:
            raise ConfigError("the vocabulary is not known yet: set data.tokenizer (model.vocab_size and "
                              "tidar.mask_token_id default to its) or model.vocab_size")
        rows = self.model.vocab_size + (self.tidar.mask_token_id == self.model.vocab_size)
        multiple = self.model.make_vocab_size_divisible_by
        return -(-rows // multiple) * multiple

    @property
    def layout(self) -> TiDARLayout:
        """The layout of one training sample: L clean tokens then the draft blocks, or L causal tokens for
        the AR objective.  Its seq_len is the sequence the model runs on."""
        t = self.train
        if self.tidar.objective == "ar":
            return TiDARLayout.causal(t.seq_length)
        return TiDARLayout.for_training(t.seq_length, self.tidar.draft_block_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolve_vocabulary(cfg: Config, vocab_size: int, mask_token_id: int, source: str) -> Config:
    """Fill model.vocab_size and tidar.mask_token_id from a tokenizer's, and check explicit values against it.

    `vocab_size`: the ids text encodes to, [0, vocab_size) (the tokenizer's own vocabulary, without a mask
    token it appends: `Tokenizer.text_vocab_size`); `mask_token_id`: its mask token (== vocab_size when
    appended: a new row).
    The model needs a row for every text id; its mask token is its own (import-hf's, or the tokenizer's by
    default).  `source` names the tokenizer in errors."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the vocabulary of "
                          f"{source} ({vocab_size}): drop it (it defaults to the tokenizer's) or set "
                          f"--model.vocab_size {vocab_size}")
    if cfg.tidar.mask_token_id is None:
        cfg.tidar.mask_token_id = mask_token_id
    cfg._check_vocabulary()
    return cfg


# --- loading -------------------------------------------------------------------------------------
def preset_dir():
    """configs/ of a checkout, else the copy installed with the package (tidar_megatron/presets)."""
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout.is_dir():
        return checkout
    return resources.files("tidar_megatron") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".yaml") for p in preset_dir().iterdir() if p.name.endswith(".yaml"))


def _read_preset(preset: str | Path, chain: tuple = ()) -> tuple[dict, str]:
    """(sections, source name) of a preset name or YAML path; a top-level `base: <preset>` is loaded first
    and the file's sections are merged over it, field by field."""
    path = Path(preset)
    if not path.suffix:
        names = preset_names()
        if str(preset) not in names:
            near = difflib.get_close_matches(str(preset), names, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"config {preset!r} not found: {hint}presets: {', '.join(names)} (or a YAML path)")
        text, source = (preset_dir() / f"{preset}.yaml").read_text(), f"configs/{preset}.yaml"
    elif not path.is_file():
        raise ConfigError(f"config {path} not found: give a preset name ({', '.join(preset_names())}) or a YAML path")
    else:
        text, source = path.read_text(), str(path)
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (model, tidar, parallel, train, data)")
    base = raw.pop("base", None)
    if base is None:
        return raw, source
    if str(base) in chain:
        raise ConfigError(f"{source}: base {base!r} includes itself")
    base_path = Path(str(base))
    if base_path.suffix and not base_path.is_absolute() and path.suffix:  # relative to the including file
        base = path.parent / base_path
    try:
        merged, base_source = _read_preset(base, chain + (str(preset),))
    except ConfigError as e:
        raise ConfigError(f"{source}: base: {e}") from None
    for section, values in raw.items():
        values = {} if values is None else values
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**_without_alternatives(merged[section], section, values), **values}
        else:
            merged[section] = values
    return merged, f"{source} (on {base_source})"


def load_config(preset: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset (a name in configs/ or a YAML path) and apply `--section.field value` overrides."""
    raw, source = _read_preset(preset)
    raw = {k: ({} if v is None else v) for k, v in raw.items()}  # an empty section (`data:`) is no section
    from_cli = set()
    for key, value in parse_overrides(overrides or []):
        key = ALIASES.get(key, key)
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"--{key} (command line): use --section.field (e.g. --model.num_layers 4)")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section} is not a mapping of fields (overriding --{key})")
        raw[section][name] = value
        from_cli.add((section, name))
    for section, name in from_cli:  # a field given on the command line replaces its alternative from the file
        other = ALTERNATIVES.get((section, name))
        if other and other not in from_cli and raw[section].get(other[1]) is not None:
            raw[section][other[1]] = None
    return from_dict(raw, source=source, from_cli=from_cli)


# Fields that say the same thing two ways: a later source (an including file, the command line) that sets one
# replaces the other from an earlier one, so `--train.lr_warmup_steps 100` works on a preset with a fraction.
ALTERNATIVES = {("train", "lr_warmup_steps"): ("train", "lr_warmup_fraction"),
                ("train", "lr_warmup_fraction"): ("train", "lr_warmup_steps")}


def _without_alternatives(base: dict, section: str, values: dict) -> dict:
    """`base`'s fields less those whose alternative `values` sets."""
    dropped = {other[1] for name in values if (other := ALTERNATIVES.get((section, name))) and other[1] not in values}
    return {k: v for k, v in base.items() if k not in dropped}


def parse_overrides(args: list[str]) -> list[tuple[str, object]]:
    """['--a.b', '1', '--c.d=x', '--e.f', 'y', 'z'] -> [('a.b', 1), ('c.d', 'x'), ('e.f', ['y', 'z'])]; values
    are parsed as YAML scalars, several values after one option make a list (`--data.blend 0.7 a 0.3 b`)."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (command line): overrides look like --section.field value")
        if "=" in arg:
            key, values = arg[2:].split("=", 1)[0], [arg.split("=", 1)[1]]
            i += 1
        else:
            key, values = arg[2:], []
            while i + 1 + len(values) < len(args) and not _is_override(args[i + 1 + len(values)]):
                values.append(args[i + 1 + len(values)])
            if not values:
                raise ConfigError(f"override {arg} (command line) has no value")
            i += 1 + len(values)
        try:
            parsed = [yaml.safe_load(v) for v in values]
        except yaml.YAMLError:
            raise ConfigError(f"--{key} (command line): {' '.join(values)!r} is not a value (quote it to pass a "
                              "string)") from None
        out.append((key, parsed[0] if len(parsed) == 1 else parsed))
    return out


def _is_override(arg: str) -> bool:
    return arg.startswith("--") and "." in arg.split("=")[0] and not arg[2:3].isdigit()


def from_dict(raw: dict, source: str = "<dict>", from_cli: set | None = None) -> Config:
    """A Config from nested dicts; `from_cli`: the (section, field) pairs given on the command line, so
    that errors about them name the command line rather than `source`."""
    from_cli = from_cli or set()
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    for name in raw:
        if name not in sections:
            cli = any(s == name for s, _ in from_cli)
            near = difflib.get_close_matches(name, sections, n=1)
            hint = f"did you mean {'--' if cli else ''}{near[0]}?; " if near else ""
            where = f"--{name}.* (command line)" if cli else f"{source}"
            raise ConfigError(f"{where}: unknown section(s) [{name!r}]; {hint}sections: {', '.join(sections)}")
    kwargs = {name: _build(hints[name], raw.get(name) or {}, name, source, from_cli) for name in sections}
    try:
        return Config(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_where(source, from_cli)}: {e}") from None


def _where(source: str, from_cli) -> str:
    return f"{source} with the command-line overrides" if from_cli else source


def _build(cls, values: dict, section: str, source: str, from_cli: set):
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {section} must be a mapping of fields, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            cli = (section, key) in from_cli
            dash = "--" if cli else ""
            hint = f"; did you mean {dash}{section}.{near[0]}?" if near else f"; {section} has: {', '.join(names)}"
            where = f"--{section}.{key} (command line)" if cli else source
            raise ConfigError(f"{where}: unknown field(s) {section}.{key}{hint}")
    coerced = {k: _coerce(v, hints[k], f"{section}.{k}", f"--{section}.{k} (command line)"
                          if (section, k) in from_cli else source) for k, v in values.items()}
    try:
        return cls(**coerced)
    except ConfigError as e:
        cli_fields = [k for k in values if (section, k) in from_cli]
        raise ConfigError(f"{_where(source, cli_fields)}: {e}") from None


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
    elif typ is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{source}: {name} must be {_type_name(typ)}, got {value!r}")


def _type_name(typ) -> str:
    args = typing.get_args(typ)
    if type(None) in args:
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if typing.get_origin(typ) is list:
        return f"list of {_type_name(typing.get_args(typ)[0])}"
    return getattr(typ, "__name__", str(typ))


def describe() -> str:
    """Every field as `--section.field TYPE  help (default X; one of ...)`, section by section."""
    hints = typing.get_type_hints(Config)
    lines = []
    for section in dataclasses.fields(Config):
        cls = hints[section.name]
        lines.append(f"\n{section.name}:")
        field_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            choices = f.metadata.get("choices")
            allowed = f"; one of {', '.join(map(str, choices))}" if choices else ""
            lines.append(f"  --{section.name}.{f.name} {_type_name(field_hints[f.name]).upper()}")
            lines.append(f"      {f.metadata.get('help', '')} (default {default!r}{allowed})")
    return "\n".join(lines)
