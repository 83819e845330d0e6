"""Reading Hugging Face checkpoint directories for `model.py`.

Only config.json and the safetensors files are read: transformers' modeling code is not used, so the parity
tests against transformers compare two independent implementations.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from tidar_megatron.convert.hf_config import (
    NOT_A_MODEL_DIR,
    HFCheckpointNotFound,
    HFConfig,
    HFConfigError,
    UnsupportedHFCheckpoint,
    read_hf_config,
    read_json,
)
from tidar_megatron.inference.model import ModelArgs, Transformer, rope_inverse_frequencies

SUPPORTED_ROPE_TYPES = ("default", "llama3")


def model_args(hf: HFConfig, source: str = "config.json") -> ModelArgs:
    """The decoder's architecture from the shared config.json reading (convert/hf_config.py)."""
    if hf.sliding_window:
        raise UnsupportedHFCheckpoint(f"{source}: use_sliding_window=true is not supported: the decoder uses full attention")
    if hf.rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedHFCheckpoint(f"{source}: rope_type {hf.rope_type!r} is not supported by the TiDAR decoder "
                            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    # ModelArgs' fields are named as the shared reading names them: the architecture carries over as is.
    return ModelArgs(**{f.name: getattr(hf, f.name) for f in fields(ModelArgs)})


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of a Hugging Face directory (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(read_json(model_dir, index.name)["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    if not (model_dir / files[0]).is_file():
        raise HFCheckpointNotFound(f"{model_dir} has no model.safetensors (or safetensors index); only safetensors "
                            "checkpoints are read")
    weights = {}
    for name in files:
        weights.update(load_file(str(model_dir / name)))
    # Older checkpoints store RoPE's inverse frequencies; they are derived from the config here.
    return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}


def load_hf_model(model_dir: str | Path, dtype=torch.float32, device="cpu") -> tuple[Transformer, HFConfig]:
    """The decoder with the checkpoint's weights, and the config it was read with (tidar_* fields, EOS ids,
    chat template, context length)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HFCheckpointNotFound(f"{model_dir}: not found; {NOT_A_MODEL_DIR}")
    weights = load_weights(model_dir)
    hf = read_hf_config(model_dir, weights)
    args = model_args(hf, str(model_dir / "config.json"))
    if args.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # a tied head is the embedding (a stored copy equals it)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (args.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise HFConfigError(f"{model_dir}: weights do not match config.json: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty breaks the tie; restore it
    # Meta-device buffers hold no values, and `.to(dtype)` would round RoPE's frequencies: recompute in fp32.
    model.inv_freq = rope_inverse_frequencies(args).to(device)
    return model.eval(), hf
