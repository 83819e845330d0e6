"""YaRN settings for megatron-core's GPTModel (written against megatron-core 0.19.2).

`GPTModel(position_embedding_type="yarn")` and every `Attention` layer read YaRN's settings with getattr from
the TransformerConfig (`yarn_rotary_scaling_factor`, `yarn_original_max_position_embeddings`, ...), but
TransformerConfig has no such fields (only MLATransformerConfig has its own): they are set as attributes, as
Megatron-Bridge's model providers do.  Without `yarn_rotary_scaling_factor` the attention layers would
silently skip YaRN's factor on cos / sin, so all of them are set together, here.
"""

from __future__ import annotations


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
