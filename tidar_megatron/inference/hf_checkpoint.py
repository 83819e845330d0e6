"""Reading (and, for tests and benchmarks, writing) Hugging Face checkpoint directories for `model.py`.

Only config.json and the safetensors files are read: transformers' modeling code is not used, so the parity
tests against transformers compare two independent implementations.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tidar_megatron.inference.model import ModelArgs, Transformer, rope_inverse_frequencies

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3", "llama")


@dataclass(frozen=True)
class TiDARFields:
    """The decoding settings an exported checkpoint carries besides the architecture."""
    mask_token_id: int | None
    draft_block_size: int | None
    eos_token_ids: tuple[int, ...]


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a Hugging Face model directory "
                                f"(for example the output of `tidar-megatron export`)")
    return json.loads(path.read_text())


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    # transformers 5 writes `rope_parameters`; older exports have `rope_theta` and `rope_scaling`.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        return theta, rope
    raise NotImplementedError(f"rope_type {rope_type!r} in config.json is not supported by the TiDAR decoder "
                              f"(supported: default, llama3)")


def model_args_from_config(config: dict, weight_names: set[str]) -> ModelArgs:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {model_type!r} is not supported; expected one of "
                                  f"{SUPPORTED_MODEL_TYPES}")
    if config.get("use_sliding_window"):
        raise NotImplementedError("use_sliding_window=true is not supported: the decoder uses full attention")
    theta, scaling = _rope_settings(config)
    heads = config["num_attention_heads"]
    # Biases and QK-norm are read off the weights: Qwen2 always has q/k/v biases without saying so in its
    # config, while Llama says it with `attention_bias`.
    return ModelArgs(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in weight_names,
        qk_norm="model.layers.0.self_attn.q_norm.weight" in weight_names,
        tie_word_embeddings="lm_head.weight" not in weight_names)


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of a Hugging Face directory (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if not (model_dir / files[0]).is_file():
        raise FileNotFoundError(f"{model_dir} has no model.safetensors (or safetensors index)")
    weights = {}
    for name in files:
        weights.update(load_file(str(model_dir / name)))
    # Older checkpoints store RoPE's inverse frequencies; they are derived from the config here.
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def tidar_fields(config: dict, model_dir: Path) -> TiDARFields:
    eos = config.get("eos_token_id")
    generation = model_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    return TiDARFields(config.get("tidar_mask_token_id"), config.get("tidar_draft_block_size"), eos_ids)


def load_hf_model(model_dir: str | Path, dtype=torch.float32, device="cpu") -> tuple[Transformer, TiDARFields]:
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    weights = load_weights(model_dir)
    args = model_args_from_config(config, set(weights))
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (args.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: weights do not match config.json: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty breaks the tie; restore it
    # Meta-device buffers hold no values, and `.to(dtype)` would round RoPE's frequencies: recompute in fp32.
    model.inv_freq = rope_inverse_frequencies(args).to(device)
    return model.eval(), tidar_fields(config, model_dir)


def save_weights(model: Transformer, model_dir: str | Path):
    """Overwrites the safetensors weights of an existing HF directory with `model`'s (tests, benchmarks)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, str(Path(model_dir) / "model.safetensors"), metadata={"format": "pt"})
