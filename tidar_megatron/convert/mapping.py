"""Hugging Face Qwen2 / Qwen3 / Llama / Mistral <-> TiDAR Megatron: the config and the weight mapping, written once.

Pure tensor code (no Megatron, no transformers), so both directions share one table and can be tested
alone.  Megatron names are the single-rank (TP=1, PP=1) parameter names of `TiDARModel` with the local
layer spec; dist_checkpointing reshards them to any layout.

Vocabulary rows.  Megatron's embedding and output layer have `cfg.padded_vocab_size` rows: the checkpoint's
vocabulary (`model.vocab_size`), the mask token when it is a new id (== vocab_size), then padding (to a
multiple that does not depend on TP).  The mask token is decided once, at import (`choose_mask_token`), so
that the config, the checkpoint and the tokenizer agree.  An export keeps the real rows (`real_vocab_rows`)
and drops the padding: padding ids stand for no token, and a serving engine sampling from a padded head
could emit ids its tokenizer cannot decode.
"""

from __future__ import annotations

import dataclasses

import torch

from tidar_megatron.config import Config
from tidar_megatron.errors import TiDARError
from tidar_megatron.hf import rope
from tidar_megatron.hf.config import MODEL_TYPES, HFConfig, HFConfigError, parse_hf_config

# The architecture each model_type converts to (Mistral without a sliding window is Llama's).
FAMILIES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "mistral": "llama"}
# config.json fields the typed config holds (export writes them from it); import-hf keeps the rest.
TYPED_FIELDS = ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                "rope_parameters", "rope_scaling", "original_max_position_embeddings", "tie_word_embeddings",
                "torch_dtype", "dtype", "transformers_version", "_name_or_path", "tidar_mask_token_id",
                "tidar_draft_block_size")


class ConvertError(TiDARError, ValueError):
    pass


# --- config ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MaskToken:
    """The vocabulary decision of an import: `vocab_size` rows of token ids, then the mask token's id."""
    vocab_size: int
    mask_token_id: int
    fresh_row: bool     # its row starts as the mean embedding (a new id, or a row no token uses)
    story: str          # one line for the log: which row and how it starts


def choose_mask_token(hf: HFConfig, requested: int | None = None, tokenizer: tuple[int, int] | None = None,
                      source: str = "config.json") -> MaskToken:
    """The mask token of an import, in this order: `requested` (--mask-token-id), the checkpoint's own
    (`tidar_mask_token_id` of a TiDAR export), the tokenizer's (our wrapper's: its `<|mask|>`, else the first
    id after its vocabulary, which is a spare row in checkpoints such as Qwen's), else a new id after the
    vocabulary.  `tokenizer`: (text_vocab_size, mask_id) of the directory's tokenizer, if it has one."""
    exported = hf.tidar_mask_token_id
    # A TiDAR export whose mask token was a new id has it as its last row: the vocabulary ends before.
    vocab = hf.vocab_size - (exported == hf.vocab_size - 1)
    text_vocab = tokenizer[0] if tokenizer else None
    if text_vocab is not None and text_vocab > vocab:
        raise ConvertError(f"{source}: the tokenizer has {text_vocab} tokens but vocab_size is {vocab}: ids "
                           f">= {vocab} would have no embedding row")
    mask = next(m for m in (requested, exported, tokenizer[1] if tokenizer else None, vocab) if m is not None)
    if not 0 <= mask <= vocab:
        raise ConvertError(f"mask token id {mask} is outside [0, {vocab}] (vocab_size = a new token)")
    if mask == exported:
        return MaskToken(vocab, mask, False, f"mask token {mask}: the checkpoint's own (tidar_mask_token_id), its "
                                             "trained row kept")
    if mask == vocab:
        return MaskToken(vocab, mask, True, f"mask token {mask}: a new row after the {vocab}-row vocabulary, "
                                            "initialised to the mean embedding")
    if text_vocab is not None and mask >= text_vocab:
        return MaskToken(vocab, mask, True, f"mask token {mask}: an unused row of the checkpoint (the tokenizer "
                                            f"has {text_vocab} tokens), initialised to the mean embedding")
    return MaskToken(vocab, mask, False, f"mask token {mask}: an existing row, its trained embedding kept")


def config_from_hf(hf: dict | HFConfig, weights, tensor_parallel: int | None = None,
                   pipeline_parallel: int | None = None, mask: MaskToken | None = None,
                   base: Config | None = None, source: str = "config.json") -> Config:
    """A TiDAR `Config` for a Hugging Face config.json (its contents or `hf.config.read_hf_config`'s
    reading) and its weights by name (or only their names).

    The architecture and RoPE come from config.json, the rest of config.json goes to `model.hf_config` for
    export; everything else (training settings, the vocabulary padding multiple, the attention backend,
    TP/PP unless given) from `base`, a preset.  The draft block size is the checkpoint's own where it has
    one, and the sequence length at most its context.  `mask`: `choose_mask_token`'s decision (default: the
    checkpoint's own mask token, else a new id)."""
    try:
        hf = hf if isinstance(hf, HFConfig) else parse_hf_config(hf, weights, source)
    except HFConfigError as e:
        raise ConvertError(str(e)) from None
    problem = rope.megatron_problem(hf.rope_scaling)
    if problem:
        raise ConvertError(f"{source}: {hf.rope_block}.{problem}")
    mask = mask or choose_mask_token(hf, source=source)
    base = base or Config()
    # The rest of config.json, and its RoPE block as transformers keeps it, for an export that reads back as
    # the source while the RoPE is unchanged (model.rope_* are what trains).
    kept = {"config.json": {**{k: v for k, v in hf.raw.items() if k not in TYPED_FIELDS},
                            "rope_parameters": rope.transformers_block(hf.raw)}}
    if hf.generation is not None:
        kept["generation_config.json"] = hf.generation
    model = dataclasses.replace(
        base.model, num_layers=hf.num_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_heads,
        num_query_groups=hf.num_kv_heads, ffn_hidden_size=hf.intermediate_size,
        kv_channels=None if hf.head_dim * hf.num_heads == hf.hidden_size else hf.head_dim,
        vocab_size=mask.vocab_size, normalization="RMSNorm", norm_epsilon=hf.rms_norm_eps, activation="swiglu",
        add_qkv_bias=hf.attention_bias, qk_layernorm=hf.qk_norm, tie_embeddings=hf.tie_word_embeddings,
        rope_base=hf.rope_theta, rope_scaling=hf.rope_scaling, hf_config=kept)
    train = base.train
    if hf.max_position_embeddings and train.seq_length > hf.max_position_embeddings:
        train = dataclasses.replace(train, seq_length=hf.max_position_embeddings)
    tidar = dataclasses.replace(base.tidar, mask_token_id=mask.mask_token_id,
                                draft_block_size=hf.tidar_draft_block_size or base.tidar.draft_block_size)
    parallel = dataclasses.replace(base.parallel, tensor_parallel=tensor_parallel or base.parallel.tensor_parallel,
                                   pipeline_parallel=pipeline_parallel or base.parallel.pipeline_parallel)
    return dataclasses.replace(base, model=model, tidar=tidar, parallel=parallel, train=train)


def real_vocab_rows(cfg: Config) -> int:
    """Embedding rows that stand for tokens: the vocabulary and, when it is a new id, the mask token."""
    return cfg.model.vocab_size + (cfg.tidar.mask_token_id == cfg.model.vocab_size)


def architecture(cfg: Config) -> str:
    m = cfg.model
    if m.normalization != "RMSNorm" or m.activation != "swiglu":
        raise ConvertError(f"model.normalization={m.normalization}, model.activation={m.activation}: only "
                           "RMSNorm with SwiGLU maps to Qwen2 / Qwen3 / Llama")
    if m.qk_layernorm and m.add_qkv_bias:
        raise ConvertError("model.qk_layernorm with model.add_qkv_bias has no Hugging Face architecture "
                           "(Qwen3 has QK-norm without biases, Qwen2 biases without QK-norm)")
    return "qwen3" if m.qk_layernorm else "qwen2" if m.add_qkv_bias else "llama"


def hf_files(cfg: Config, dtype: torch.dtype, bos_token_id: int | None = None,
             eos_token_id: int | None = None) -> tuple[dict, dict]:
    """(config.json, generation_config.json) of an export.  From an import: the source's files with the
    architecture, RoPE, vocabulary and dtype of `cfg`, the context the longer of the source's and the
    training sequence.  From scratch: the matching architecture with the tokenizer's `bos_token_id` /
    `eos_token_id`.  Both carry `tidar_mask_token_id` and `tidar_draft_block_size`."""
    m, arch = cfg.model, architecture(cfg)
    kept = m.hf_config or {}
    out = dict(kept.get("config.json", {}))
    if FAMILIES.get(out.get("model_type")) != arch:  # no source, or one of another architecture
        out = {"model_type": arch, "hidden_act": "silu", "attention_dropout": 0.0, "use_cache": True,
               "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
               **({"attention_bias": False, "mlp_bias": False} if arch == "llama" else
                  {"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers})}
        kept = {}
    source_rope = out.pop("rope_parameters", None)
    if len(out.get("layer_types") or [None] * m.num_layers) != m.num_layers:
        out.pop("layer_types")
    out.update({
        "architectures": [MODEL_TYPES[out["model_type"]]],
        "vocab_size": real_vocab_rows(cfg), "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "head_dim": m.head_dim, "rms_norm_eps": m.norm_epsilon,
        # The context the model serves: its source's, or the longer sequence it was trained on.
        "max_position_embeddings": max(out.get("max_position_embeddings") or 0, cfg.train.seq_length),
        "tie_word_embeddings": m.tie_embeddings,
        # transformers 5 reads dtype, 4.x torch_dtype.
        "dtype": str(dtype).removeprefix("torch."), "torch_dtype": str(dtype).removeprefix("torch."),
        "tidar_mask_token_id": cfg.tidar.mask_token_id, "tidar_draft_block_size": cfg.tidar.draft_block_size,
    })
    out.update(rope.config_json_fields(m.rope_base, m.rope_scaling, source_rope, out["max_position_embeddings"]))
    if kept and m.kv_channels is None and "head_dim" not in kept["config.json"]:
        del out["head_dim"]  # implied by hidden_size / num_attention_heads, as in the source (Qwen2 has no field)
    generation = kept.get("generation_config.json") or \
        {k: out.get(k) for k in ("bos_token_id", "eos_token_id") if out.get(k) is not None}
    return out, generation


# --- weights --------------------------------------------------------------------------------------
def _qkv_to_megatron(cfg: Config, q, k, v):
    """Megatron's fused QKV rows are grouped per query group: [q heads of group g; k_g; v_g] for each g."""
    groups = cfg.model.num_query_groups
    rest = q.shape[1:]
    q, k, v = (t.reshape(groups, -1, *rest) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _qkv_to_hf(cfg: Config, qkv):
    m = cfg.model
    per_group = m.num_attention_heads // m.num_query_groups * m.head_dim
    grouped = qkv.reshape(m.num_query_groups, per_group + 2 * m.head_dim, *qkv.shape[1:])
    q, k, v = grouped.split([per_group, m.head_dim, m.head_dim], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]) for t in (q, k, v))


def _vocab_to_megatron(cfg: Config, rows):
    """Rows past the Hugging Face vocabulary (the new mask token, TP padding) start as the mean embedding:
    a neutral input of typical norm for the mask token, and as an output row a logit equal to the mean logit,
    so by Jensen's inequality each new id takes at most 1/V of the probability mass and the imported model's
    next-token distribution is nearly unchanged (Hewitt, "Initializing new word embeddings", 2021)."""
    extra = cfg.padded_vocab_size - rows.shape[0]
    if extra < 0:
        raise ConvertError(f"the checkpoint has {rows.shape[0]} vocabulary rows, more than the "
                           f"{cfg.padded_vocab_size} of model.vocab_size={cfg.model.vocab_size} padded")
    rows = rows.float()  # the mean of bf16 rows in fp32
    return torch.cat([rows, rows.mean(0, keepdim=True).expand(extra, -1)])


def start_mask_row_as_mean(cfg: Config, params: dict[str, torch.Tensor], source_rows: int):
    """Give the mask token's row the mean of the checkpoint's `source_rows` rows, as `_vocab_to_megatron`
    gives new rows: for a spare row of the checkpoint that no token uses (`MaskToken.fresh_row`)."""
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in params:
            params[name][cfg.tidar.mask_token_id] = params[name][:source_rows].mean(0)


def _vocab_to_hf(cfg: Config, rows):
    return rows[:real_vocab_rows(cfg)]


# Transforms: (to Megatron: HF tensors -> one tensor, to HF: one tensor -> HF tensors).
COPY = (lambda cfg, t: t, lambda cfg, t: (t,))
QKV = (_qkv_to_megatron, _qkv_to_hf)
GATE_UP = (lambda cfg, gate, up: torch.cat([gate, up]), lambda cfg, t: t.chunk(2))  # SwiGLU fc1 = [gate; up]
VOCAB = (_vocab_to_megatron, lambda cfg, t: (_vocab_to_hf(cfg, t),))

_ATTN, _HF_ATTN = "decoder.layers.{i}.self_attention.", "model.layers.{i}.self_attn."
# (Megatron name, Hugging Face names, transform, needed when); {i} is the layer index.
TABLE = [
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB, None),
    ("decoder.layers.{i}.input_layernorm.weight", ("model.layers.{i}.input_layernorm.weight",), COPY, None),
    (_ATTN + "linear_qkv.weight", tuple(_HF_ATTN + f"{p}_proj.weight" for p in "qkv"), QKV, None),
    (_ATTN + "linear_qkv.bias", tuple(_HF_ATTN + f"{p}_proj.bias" for p in "qkv"), QKV, "add_qkv_bias"),
    (_ATTN + "q_layernorm.weight", (_HF_ATTN + "q_norm.weight",), COPY, "qk_layernorm"),
    (_ATTN + "k_layernorm.weight", (_HF_ATTN + "k_norm.weight",), COPY, "qk_layernorm"),
    (_ATTN + "linear_proj.weight", (_HF_ATTN + "o_proj.weight",), COPY, None),
    ("decoder.layers.{i}.pre_mlp_layernorm.weight", ("model.layers.{i}.post_attention_layernorm.weight",),
     COPY, None),
    ("decoder.layers.{i}.mlp.linear_fc1.weight", ("model.layers.{i}.mlp.gate_proj.weight",
                                                  "model.layers.{i}.mlp.up_proj.weight"), GATE_UP, None),
    ("decoder.layers.{i}.mlp.linear_fc2.weight", ("model.layers.{i}.mlp.down_proj.weight",), COPY, None),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), COPY, None),
    ("output_layer.weight", ("lm_head.weight",), VOCAB, "untied"),
]


def _entries(cfg: Config):
    """(Megatron name, HF names, transform) of every parameter of this config."""
    m = cfg.model
    flags = {None: True, "add_qkv_bias": m.add_qkv_bias, "qk_layernorm": m.qk_layernorm,
             "untied": not m.tie_embeddings}
    for mg, hf, transform, when in TABLE:
        if not flags[when]:
            continue
        layers = range(m.num_layers) if "{i}" in mg else [None]
        for i in layers:
            yield mg.format(i=i), tuple(n.format(i=i) for n in hf), transform


def hf_to_megatron(cfg: Config, weights: dict[str, torch.Tensor], source: str = "checkpoint") -> dict:
    missing = [n for _, hf, _ in _entries(cfg) for n in hf if n not in weights]
    if missing:
        raise ConvertError(f"{source}: missing {len(missing)} weight(s) that config.json implies, e.g. "
                           f"{missing[0]}")
    return {mg: transform[0](cfg, *(weights[n] for n in hf)) for mg, hf, transform in _entries(cfg)}


def megatron_to_hf(cfg: Config, params: dict[str, torch.Tensor]) -> dict:
    out = {}
    for mg, hf, transform in _entries(cfg):
        out.update(zip(hf, transform[1](cfg, params[mg])))
    return {k: v.contiguous() for k, v in out.items()}
