"""RoPE in megatron-core's GPTModel the way TiDAR needs it (written against megatron-core 0.19.2).

    set_yarn            YaRN's settings, which GPTModel and every Attention layer read with getattr from the
                        TransformerConfig (`yarn_rotary_scaling_factor`, ...), though TransformerConfig has no
                        such fields (only MLATransformerConfig has its own): they are set as attributes, as
                        Megatron-Bridge's model providers do.  Without `yarn_rotary_scaling_factor` the
                        attention layers would silently skip YaRN's factor on cos / sin, so all are set here.
    RopeAtPositions     a GPTModel mixin that applies RoPE at the given position ids: GPTModel computes its
                        rotary table for 0..S-1 in the private `_preprocess` and ignores position_ids.

Check both when megatron-core is upgraded (tests/test_convert.py compares logits with transformers' at every
RoPE scaling; tests/test_model.py runs every backend at the layout's positions).
"""

from __future__ import annotations

import torch
from megatron.core import package_info

from tidar_megatron.errors import TiDARError

WRITTEN_FOR = (0, 19)  # megatron-core major, minor


def set_yarn(config, scaling: dict):
    """Give a TransformerConfig the YaRN settings of `scaling` (hf.rope's normalised yarn block).  The
    attention factor follows from factor, mscale and mscale_all_dim as in transformers: megatron-core uses
    the pair only when both are set (None, None otherwise)."""
    config.yarn_rotary_scaling_factor = scaling["factor"]
    config.yarn_original_max_position_embeddings = scaling["original_max_position_embeddings"]
    config.yarn_beta_fast = scaling["beta_fast"]
    config.yarn_beta_slow = scaling["beta_slow"]
    config.yarn_mscale = scaling.get("mscale")
    config.yarn_mscale_all_dim = scaling.get("mscale_all_dim")
    config.yarn_correction_range_round_to_int = scaling["truncate"]
    return config


def check_megatron_core_version(installed: tuple[int, int] = (package_info.MAJOR, package_info.MINOR)):
    if tuple(installed) != WRITTEN_FOR:
        raise TiDARError(
            f"tidar_megatron/compat/megatron_rope.py overrides GPTModel._preprocess of megatron-core "
            f"{WRITTEN_FOR[0]}.{WRITTEN_FOR[1]}, but {installed[0]}.{installed[1]} is installed; pip install "
            f"'megatron-core>={WRITTEN_FOR[0]}.{WRITTEN_FOR[1]},<{WRITTEN_FOR[0]}.{WRITTEN_FOR[1] + 1}' "
            "or port RopeAtPositions to the new _preprocess")


class RopeAtPositions:
    """Mix in before GPTModel: RoPE at `position_ids` ([S], or [b, S] per sample) instead of 0..S-1.

    megatron-core 0.19's `_preprocess` returns (decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
    sequence_len_offset, padding_mask[, rotary_pos_cos_sin]); only the training path, where rotary_pos_emb is
    the [S, 1, 1, d] table and the cos / sin slots are empty, is supported (no flash-decode inference)."""

    def __init__(self, *args, **kwargs):
        check_megatron_core_version()
        super().__init__(*args, **kwargs)

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = list(super()._preprocess(input_ids, position_ids, *args, **kwargs))
        if len(out) not in (6, 7) or any(t is not None for t in out[2:4] + out[6:]):
            raise TiDARError("compat/megatron_rope.py: GPTModel._preprocess returned cos / sin tables (flash "
                             "decode or flashinfer RoPE); TiDAR applies RoPE from rotary_pos_emb only: turn "
                             "config.flash_decode off")
        if out[1] is not None:
            out[1] = rope_at_positions(self.rotary_pos_emb, position_ids)
        return tuple(out)


def rope_at_positions(rotary_pos_emb, position_ids: torch.Tensor) -> torch.Tensor:
    """megatron-core's rotary table gathered at `position_ids`: [S] -> [S, 1, 1, d]; [b, S] -> [S, b, 1, d]
    (broadcast over heads)."""
    if position_ids.dim() == 2 and torch.equal(position_ids, position_ids[:1].expand_as(position_ids)):
        position_ids = position_ids[0]
    table = rotary_pos_emb(int(position_ids.max()) + 1)
    if isinstance(table, tuple):  # YaRN's also returns its cos / sin factor, which attention applies
        table = table[0]
    if position_ids.dim() == 1:
        return table[position_ids.to(table.device)]
    return table[position_ids.to(table.device)][:, :, 0].transpose(0, 1)
