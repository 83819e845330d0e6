"""The one reader of a Hugging Face checkpoint's config.json, shared by conversion and the decoder.

What the config leaves implicit is read the way transformers reads it:
  * q/k/v biases and QK-norm from the weights' names (Qwen2 always has the biases without saying so),
  * tied embeddings as transformers (5.x) decides them: `tie_word_embeddings` (default false for these
    model types), except that a stored `lm_head.weight` that differs from the embedding keeps its own
    values (transformers then does not tie, and warns); whether the head is stored alone decides nothing,
  * RoPE as `rope.read_rope` says (rope_scaling before rope_parameters, 4.x spellings),
  * a sliding window: Qwen's `use_sliding_window`, Mistral's `sliding_window` (4096 when absent),
  * the end-of-sequence ids from generation_config.json, else config.json.
Everything the supported architectures cannot run is refused here, naming the field, so conversion and the
decoder accept exactly the same checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tidar_megatron.errors import TiDARError
from tidar_megatron.hf.rope import RopeError, read_rope

# config.json's torch_dtype names, and the dtypes --dtype offers (export, generate, evaluate, serve, lm-eval).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# model_type -> transformers class; Mistral without a sliding window is Llama with another name.
MODEL_TYPES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM",
               "mistral": "MistralForCausalLM"}
# Mistral's sliding_window when config.json does not set it (transformers' MistralConfig default).
MISTRAL_DEFAULT_WINDOW = 4096


class HFConfigError(TiDARError, ValueError):
    pass


class HFCheckpointNotFound(HFConfigError, FileNotFoundError):
    pass


class UnsupportedHFCheckpoint(HFConfigError, NotImplementedError):
    pass


NOT_A_MODEL_DIR = "pass a Hugging Face model directory (config.json + safetensors, e.g. `tidar-megatron export`'s)"


@dataclass(frozen=True)
class HFConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None          # rope.normalise's form; None = plain RoPE
    rope_block: str                    # the config.json block RoPE was read from (for errors)
    attention_bias: bool               # q/k/v biases
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int | None
    tidar_mask_token_id: int | None    # written by `tidar-megatron export`
    tidar_draft_block_size: int | None
    eos_token_ids: tuple[int, ...]
    chat_template: str | None          # the tokenizer's, when the directory carries one
    raw: dict                          # config.json as it is
    generation: dict | None            # generation_config.json, when there is one


def read_json(model_dir: Path, name: str) -> dict:
    path = Path(model_dir) / name
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_hf_config(model_dir: str | Path, weights) -> HFConfig:
    """Parse `model_dir`/config.json (with generation_config.json and the tokenizer's chat template);
    `weights`: the checkpoint's tensors by name (or only their names; see `parse_hf_config`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HFCheckpointNotFound(f"{model_dir}: not found; {NOT_A_MODEL_DIR}")
    if not (model_dir / "config.json").is_file():
        raise HFCheckpointNotFound(f"{model_dir} has no config.json: {NOT_A_MODEL_DIR}")
    raw = read_json(model_dir, "config.json")
    generation = None
    if (model_dir / "generation_config.json").is_file():
        generation = read_json(model_dir, "generation_config.json")
    template = None
    if (model_dir / "tokenizer_config.json").is_file():
        template = read_json(model_dir, "tokenizer_config.json").get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    return parse_hf_config(raw, weights, str(model_dir / "config.json"), template, generation)


def parse_hf_config(raw: dict, weights, source: str = "config.json", chat_template: str | None = None,
                    generation: dict | None = None) -> HFConfig:
    """An HFConfig from config.json's contents (`source` names it in errors).  `weights`: tensors by name;
    given only the names, a stored head is taken to equal the embedding of a tied config."""
    weight_names = set(weights)
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UnsupportedHFCheckpoint(f"{source}: model_type {model_type!r} is not supported; expected one of "
                                      f"{', '.join(MODEL_TYPES)}")
    try:
        theta, scaling, rope_block = read_rope(raw)
    except RopeError as e:
        raise UnsupportedHFCheckpoint(f"{source}: {e}") from None
    _check_supported(raw, weight_names, source)
    heads = raw["num_attention_heads"]
    layer0 = "model.layers.0."
    eos = (generation or {}).get("eos_token_id", raw.get("eos_token_id"))
    return HFConfig(
        model_type=model_type, vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_layers=raw["num_hidden_layers"], num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, rope_block=rope_block,
        attention_bias=layer0 + "self_attn.q_proj.bias" in weight_names,
        qk_norm=layer0 + "self_attn.q_norm.weight" in weight_names,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)) and not _separate_head(weights),
        max_position_embeddings=raw.get("max_position_embeddings"),
        tidar_mask_token_id=raw.get("tidar_mask_token_id"), tidar_draft_block_size=raw.get("tidar_draft_block_size"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)),
        chat_template=chat_template, raw=raw, generation=generation)


def _check_supported(raw: dict, weight_names: set, source: str):
    """One line naming every field the decoder-only RMSNorm / SwiGLU / full-attention layer cannot run."""
    problems = []
    if raw["model_type"] in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
        problems.append("use_sliding_window=true (TiDAR attention is full attention)")
    window = raw.get("sliding_window", MISTRAL_DEFAULT_WINDOW)
    if raw["model_type"] == "mistral" and window is not None:
        problems.append(f"sliding_window={window}{' (the default when absent)' if 'sliding_window' not in raw else ''}"
                        " (TiDAR attention is full attention; Mistral v0.2 and later set it to null)")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r} (only SwiGLU with silu)")
    if {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.gate_proj.bias"} & weight_names:
        problems.append("biases on o_proj or the MLP (the layers here have q/k/v biases only)")
    if problems:
        raise UnsupportedHFCheckpoint(f"{source}: not supported: " + "; ".join(problems))


def _separate_head(weights) -> bool:
    """A stored lm_head.weight with values of its own (not the embedding's)."""
    if not isinstance(weights, dict) or "lm_head.weight" not in weights:
        return False
    head, embedding = weights["lm_head.weight"], weights.get("model.embed_tokens.weight")
    return embedding is None or head.shape != embedding.shape or not torch.equal(head, embedding)
