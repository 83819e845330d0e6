"""A Hugging Face directory's safetensors weights, single file or sharded with an index."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tidar_megatron.hf.config import HFCheckpointNotFound, read_json


def load_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All safetensors weights of `model_dir` by name, in their stored dtype."""
    model_dir = Path(model_dir)
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
