"""Hugging Face Qwen2 / Qwen3 / Llama <-> TiDAR Megatron: the config and the weight mapping, written once.

Pure tensor code (no Megatron, no transformers), so both directions share one table and can be tested
alone.  Megatron names are the single-rank (TP=1, PP=1) parameter names of `TiDARModel` with the local
layer spec; dist_checkpointing reshards them to any layout.

Vocabulary rows.  Megatron's embedding and output layer have `cfg.padded_vocab_size` rows: the tokenizer's
vocabulary, the mask token when it is a new id, then padding (to a multiple that does not depend on TP).  An
export keeps the real rows (`real_vocab_rows`) and drops the padding: padding ids stand for no token, and a
serving engine sampling from a padded head could emit ids its tokenizer cannot decode.
"""

from __future__ import annotations

import dataclasses

import torch

from tidar_megatron.config import Config
from tidar_megatron.convert.hf_config import MODEL_TYPES, HFConfig, HFConfigError, parse_hf_config
from tidar_megatron.errors import TiDARError

ARCHITECTURES = MODEL_TYPES


class ConvertError(TiDARError, ValueError):
    pass


# --- config ---------------------------------------------------------------------------------------
def config_from_hf(hf: dict | HFConfig, weights, tensor_parallel: int | None = None,
                   pipeline_parallel: int | None = None, mask_token_id: int | None = None,
                   base: Config | None = None, source: str = "config.json") -> Config:
    """A TiDAR `Config` for a Hugging Face config.json (its contents or `hf_config.read_hf_config`'s
    reading) and its weights by name (or only their names).

    The architecture comes from config.json; everything else (training settings, the draft block size, the
    vocabulary padding multiple, the attention backend, TP/PP unless given) from `base`, a preset."""
    try:
        hf = hf if isinstance(hf, HFConfig) else parse_hf_config(hf, weights, source)
    except HFConfigError as e:
        raise ConvertError(str(e)) from None
    problems = []
    if hf.rope_type != "default":
        problems.append(f"rope type {hf.rope_type!r} (TiDARModel has plain RoPE only)")
    if hf.sliding_window:
        problems.append("use_sliding_window=true (TiDAR attention is full attention)")
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act {hf.hidden_act!r} (only SwiGLU with silu)")
    if hf.other_biases:
        problems.append("biases on o_proj or the MLP (Megatron's layers here have q/k/v biases only)")
    if problems:
        raise ConvertError(f"{source}: cannot convert: " + "; ".join(problems))
    # A TiDAR export whose mask token was a new id has it as its last row: the tokenizer's vocabulary ends before.
    exported_mask = hf.tidar_mask_token_id
    vocab = hf.vocab_size - (exported_mask == hf.vocab_size - 1)
    if base is None:
        base = Config()
        base.tidar.draft_block_size = hf.tidar_draft_block_size or base.tidar.draft_block_size
    model = dataclasses.replace(
        base.model, num_layers=hf.num_layers, hidden_size=hf.hidden_size, num_attention_heads=hf.num_heads,
        num_query_groups=hf.num_kv_heads, ffn_hidden_size=hf.intermediate_size,
        kv_channels=None if hf.head_dim * hf.num_heads == hf.hidden_size else hf.head_dim, vocab_size=vocab,
        normalization="RMSNorm", norm_epsilon=hf.rms_norm_eps, activation="swiglu",
        add_qkv_bias=hf.attention_bias, qk_layernorm=hf.qk_norm, tie_embeddings=hf.tie_word_embeddings,
        rope_base=hf.rope_theta)
    if model.rope_base != int(model.rope_base):
        raise ConvertError(f"{source}: rope_theta {model.rope_base} is not an integer; TiDARModel passes "
                           "RoPE's base to Megatron as an int")
    mask = mask_token_id if mask_token_id is not None else exported_mask if exported_mask is not None else vocab
    parallel = dataclasses.replace(base.parallel, tensor_parallel=tensor_parallel or base.parallel.tensor_parallel,
                                   pipeline_parallel=pipeline_parallel or base.parallel.pipeline_parallel)
    return dataclasses.replace(base, model=model, tidar=dataclasses.replace(base.tidar, mask_token_id=mask),
                               parallel=parallel)


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


def hf_config(cfg: Config, dtype: torch.dtype, eos_token_id: int | None = None) -> dict:
    """config.json of the matching architecture, with the TiDAR fields."""
    m, arch = cfg.model, architecture(cfg)
    out = {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch,
        "vocab_size": real_vocab_rows(cfg), "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups, "head_dim": m.head_dim, "hidden_act": "silu",
        # The clean context the model was trained on; RoPE itself does not limit it.
        "max_position_embeddings": cfg.train.seq_length, "rms_norm_eps": m.norm_epsilon,
        # transformers 5 reads rope_parameters, 4.x rope_theta.
        "rope_theta": m.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."), "use_cache": True,
        "eos_token_id": eos_token_id,
        "tidar_mask_token_id": cfg.tidar.mask_token_id, "tidar_draft_block_size": cfg.tidar.draft_block_size,
    }
    if arch == "llama":
        out["mlp_bias"] = False
    else:  # Qwen2's q/k/v biases are implied by the architecture; attention_bias=true would add o_proj's
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)
    return out


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
    return torch.cat([rows, rows.mean(0, keepdim=True).expand(extra, -1)])


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
