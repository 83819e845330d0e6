"""RoPE as a Hugging Face config.json means it, decided once for import, training, the decoder and export.

transformers (5.24, the installed version; `configuration_utils` and `modeling_rope_utils`) reads it so:
  * the block is `rope_scaling` when that is non-empty, else `rope_parameters`, else {}: a model card's
    `rope_scaling` added to a config written by transformers 5 replaces its `rope_parameters` entirely;
  * rope_theta is the block's own, else config.json's top-level `rope_theta`, else 10000;
  * the type is `rope_type`, else the 4.x spelling `type`, else "default";
  * llama3 and yarn take `original_max_position_embeddings` from the block, else `max_position_embeddings`;
    a top-level `original_max_position_embeddings` wins over both (the model's RoPE re-reads it);
  * yarn: `factor` null means max_position_embeddings / original; falsy beta_fast / beta_slow mean 32 / 1;
    the attention factor is derived from factor, mscale and mscale_all_dim unless given; truncate defaults
    to true.

Supported are the variants megatron-core implements for GPT models, so that training, the decoder and the
server all run the same RoPE: default, linear (megatron-core's position interpolation), llama3 and yarn.
Anything else is refused, naming the field.  Training has one limit more (`megatron_problem`):
megatron-core's llama3 scaling fixes the low / high frequency factors at 1 / 4 and the original context at
8192, the values of Llama 3.1, 3.2 and 3.3.

A scaling block is kept in one normalised form (`normalise`): the fields its type uses, defaults filled.
"""

from __future__ import annotations

import math

import torch

DEFAULT_THETA = 10000.0
SUPPORTED = ("default", "linear", "llama3", "yarn")
# megatron-core 0.19's RotaryEmbedding._apply_scaling fixes these; only the factor is an argument.
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
WHY_NOT = {
    "dynamic": "megatron-core has no dynamic NTK scaling",
    "longrope": "megatron-core has no LongRoPE",
    "su": "megatron-core has no LongRoPE",
    "proportional": "megatron-core has no proportional RoPE",
}


class RopeError(ValueError):
    """A RoPE setting that is malformed or not supported; the message names the field."""


def read_rope(raw: dict) -> tuple[float, dict | None, str]:
    """(theta, normalised scaling block or None for plain RoPE, the block's name) from config.json's
    contents, as transformers reads them (module docstring)."""
    name = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    block = transformers_block(raw)
    if block and set(block) & set(raw.get("layer_types") or ()):
        raise RopeError(f"{name} is given per layer type; only one RoPE for all layers is supported")
    partial = block.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise RopeError(f"partial_rotary_factor {partial}: only RoPE over the whole head is supported")
    try:
        return float(block["rope_theta"]), normalise(block, raw.get("max_position_embeddings")), name
    except RopeError as e:
        raise RopeError(f"{name}.{e}") from None


def transformers_block(raw: dict) -> dict:
    """The RoPE block of config.json's contents as transformers keeps it (`config.rope_parameters`): its
    own spelling, with rope_theta, rope_type and the original context filled in."""
    block = dict(raw.get("rope_scaling") or raw.get("rope_parameters") or {})
    block.setdefault("rope_theta", raw.get("rope_theta", DEFAULT_THETA))
    block.setdefault("rope_type", block.get("type", "default"))
    if block["rope_type"] in ("llama3", "yarn", "longrope"):
        original = raw.get("original_max_position_embeddings")
        if original is not None:
            block["original_max_position_embeddings"] = original
        else:
            block.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return block


def normalise(block: dict, max_position_embeddings: int | None = None) -> dict | None:
    """A scaling block in the one form every user of it reads: the fields of its type, defaults filled.
    Errors start with the offending field's name inside the block."""
    kind = block.get("rope_type", block.get("type", "default"))
    kind_key = "type" if block.get("type") == kind else "rope_type"  # the spelling config.json used
    if kind == "default":
        return None
    if kind not in SUPPORTED:
        why = WHY_NOT.get(kind, "not a RoPE type megatron-core implements")
        raise RopeError(f"{kind_key} {kind!r} is not supported: {why} (supported: {', '.join(SUPPORTED)})")
    factor = block.get("factor")
    if kind == "yarn" and factor is None and max_position_embeddings and block.get("original_max_position_embeddings"):
        factor = max_position_embeddings / block["original_max_position_embeddings"]
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise RopeError(f"factor {factor!r}: the {kind} scaling needs a positive factor")
    out = {"rope_type": kind, "factor": float(factor)}
    if kind == "llama3":
        for key in MEGATRON_LLAMA3:
            if not isinstance(block.get(key), (int, float)) or block[key] <= 0:
                raise RopeError(f"{key} {block.get(key)!r}: the llama3 scaling needs a positive {key}")
            out[key] = block[key]
    if kind == "yarn":
        original = block.get("original_max_position_embeddings")
        if not isinstance(original, int) or original < 1:
            raise RopeError(f"original_max_position_embeddings {original!r}: yarn needs the pretraining context")
        out.update(original_max_position_embeddings=original,
                   beta_fast=float(block.get("beta_fast") or 32), beta_slow=float(block.get("beta_slow") or 1),
                   truncate=bool(block.get("truncate", True)))
        if block.get("mscale") and block.get("mscale_all_dim"):  # transformers uses them only as a pair
            out.update(mscale=float(block["mscale"]), mscale_all_dim=float(block["mscale_all_dim"]))
        given = block.get("attention_factor")
        if given is not None and not math.isclose(given, yarn_attention_factor(out), rel_tol=1e-9):
            raise RopeError(f"attention_factor {given}: megatron-core derives it from factor, mscale and "
                            f"mscale_all_dim ({yarn_attention_factor(out):.6g}); another value is not supported")
    return out


def megatron_problem(scaling: dict | None) -> str | None:
    """What of a normalised block megatron-core cannot train (starting with the field), or None."""
    if scaling and scaling["rope_type"] == "llama3":
        for key, value in MEGATRON_LLAMA3.items():
            if scaling[key] != value:
                return (f"{key} {scaling[key]}: megatron-core's llama3 scaling fixes it at {value} (the value of "
                        "Llama 3.1 / 3.2 / 3.3); the decoder reads it, training cannot")
    return None


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's factor on cos and sin (transformers' and megatron-core's rule)."""
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling["factor"]
    if "mscale" in scaling:
        return float(mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"]))
    return mscale(factor)


def inverse_frequencies(theta: float, head_dim: int, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies [head_dim / 2] (fp32) and the factor on cos / sin, computed as
    transformers computes them (the decoder's RoPE; training uses megatron-core's implementation)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":  # stretch low frequencies by `factor`, keep high ones, interpolate in between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":  # extrapolate high frequencies, interpolate low ones, ramp in between
        factor, original = scaling["factor"], scaling["original_max_position_embeddings"]

        def correction_dim(rotations):
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(scaling["beta_fast"]), correction_dim(scaling["beta_slow"])
        if scaling["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = theta ** exponents
        extrapolation = 1 - ramp
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
        return inv_freq, yarn_attention_factor(scaling)
    return inv_freq, 1.0


def config_json_fields(theta: float, scaling: dict | None, source: dict | None = None,
                       max_position_embeddings: int | None = None) -> dict:
    """RoPE as config.json spells it for transformers 5 (`rope_parameters`) and 4.x (`rope_theta`,
    `rope_scaling`), one content in both spellings.  `source`: a checkpoint's own block (`transformers_block`),
    written as it is while it means this RoPE, so that transformers reads back the source's config."""
    parameters = {"rope_type": "default", "rope_theta": theta} if scaling is None else \
        {**scaling, "rope_theta": theta}
    if source is not None:
        means = read_rope({"rope_parameters": source, "max_position_embeddings": max_position_embeddings})[:2]
        parameters = dict(source) if means == (theta, scaling) else parameters
    return {"rope_theta": theta, "rope_parameters": parameters,
            "rope_scaling": None if scaling is None else dict(parameters)}
