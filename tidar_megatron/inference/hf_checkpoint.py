"""Loading Hugging Face checkpoint directories into `model.Transformer`.

Only config.json and the safetensors files are read (through `tidar_megatron.hf`, the reader conversion
uses too): transformers' modeling code is not used, so the parity tests against transformers compare two
independent implementations.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch

from tidar_megatron.errors import TiDARError
from tidar_megatron.hf.config import NOT_A_MODEL_DIR, HFCheckpointNotFound, HFConfig, HFConfigError, read_hf_config
from tidar_megatron.hf.rope import inverse_frequencies
from tidar_megatron.hf.weights import load_weights
from tidar_megatron.inference.model import ModelArgs, Transformer


def model_args(hf: HFConfig) -> ModelArgs:
    """The decoder's architecture from the shared config.json reading (what it refuses, this refuses)."""
    # ModelArgs' fields are named as the shared reading names them: the architecture carries over as is.
    return ModelArgs(**{f.name: getattr(hf, f.name) for f in fields(ModelArgs)})


def check_device(device) -> None:
    """A --device this machine cannot run, as one line before anything is loaded (not torch's traceback)."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise TiDARError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:N)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise TiDARError(f"--device {device}: no CUDA device is available on this machine; use --device cpu")


def load_hf_model(model_dir: str | Path, dtype=torch.float32, device="cpu") -> tuple[Transformer, HFConfig]:
    """The decoder with the checkpoint's weights, and the config it was read with (tidar_* fields, EOS ids,
    chat template, context length)."""
    model_dir = Path(model_dir)
    check_device(device)
    if not model_dir.is_dir():
        raise HFCheckpointNotFound(f"{model_dir}: not found; {NOT_A_MODEL_DIR}")
    weights = load_weights(model_dir)
    hf = read_hf_config(model_dir, weights)
    args = model_args(hf)
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
    model.inv_freq = inverse_frequencies(args.rope_theta, args.head_dim, args.rope_scaling)[0].to(device)
    return model.eval(), hf
