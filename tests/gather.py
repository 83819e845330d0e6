"""Full (unsharded) parameters or gradients of a rank's model chunks, keyed by their single-rank name."""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def full_tensors(model_chunks, kind: str) -> dict[str, torch.Tensor]:
    """kind: 'param' or 'grad'.  TP shards are all-gathered (SwiGLU's [gate; up] shards re-interleaved);
    pipeline stages contribute their own layers under global layer numbers."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        layers = module.decoder.layers
        for name, p in module.named_parameters():
            t = (p.main_grad if kind == "grad" else p.data).detach().clone()
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                shards = [torch.empty_like(t) for _ in range(tp)]
                torch.distributed.all_gather(shards, t, group=group)
                dim = p.partition_dim
                if name.endswith("linear_fc1.weight") and module.config.gated_linear_unit:
                    halves = [s.chunk(2, dim) for s in shards]
                    t = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim)
                else:
                    t = torch.cat(shards, dim)
            name = _LAYER.sub(lambda m: f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.", name)
            out[name] = t
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def set_full_tensors(model_chunks, full: dict[str, torch.Tensor]):
    """Inverse of full_tensors(kind='param'): copy each full tensor's shard of this rank into the model."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        module = getattr(chunk, "module", chunk)
        layers = module.decoder.layers
        for name, p in module.named_parameters():
            key = _LAYER.sub(lambda m: f"decoder.layers.{layers[int(m.group(1))].layer_number - 1}.", name)
            t = full[key]
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                dim = p.partition_dim
                if name.endswith("linear_fc1.weight") and module.config.gated_linear_unit:
                    gate, up = t.chunk(2, dim)
                    t = torch.cat([gate.chunk(tp, dim)[tp_rank], up.chunk(tp, dim)[tp_rank]], dim)
                else:
                    t = t.chunk(tp, dim)[tp_rank]
            p.data.copy_(t)


def name_seeded_init(model_chunks, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Weights that depend only on each parameter's global name, so every parallel layout starts from the
    same model (Megatron's own init draws different streams per pipeline stage)."""
    import zlib

    full = {}
    for name, t in full_tensors(model_chunks, "param").items():
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        base = 1.0 if "norm" in name else 0.0
        full[name] = base + std * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
    set_full_tensors(model_chunks, full)
    return full
