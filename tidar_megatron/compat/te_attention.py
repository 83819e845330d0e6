"""Which attention TransformerEngine ran, read from a private TE name (written against TE 2.17.1, the version
megatron-core 0.19 is built with).

    selected_attention_backends   the flags of TE's last backend choice, kept in the module global
                                  `dot_product_attention._attention_backends` ("use_flash_attention",
                                  "use_fused_attention", ...): TE publishes no other way to learn that it fell
                                  back to unfused attention (TE issue #3006)

Check this when TE is upgraded (tests/test_gpu.py runs the te backend on a GPU).
"""

from __future__ import annotations

from tidar_megatron.errors import TiDARError

WRITTEN_FOR = "2.17.1"


def selected_attention_backends() -> dict:
    """A copy of TE's last attention-backend selection; a TiDARError when this TE version keeps it elsewhere."""
    try:  # TE is the optional `te` extra: imported only when the te backend runs
        from transformer_engine.pytorch.attention.dot_product_attention import dot_product_attention as dpa

        return dict(dpa._attention_backends)
    except (ImportError, AttributeError) as e:
        raise TiDARError(f"tidar_megatron/compat/te_attention.py reads TransformerEngine {WRITTEN_FOR}'s attention "
                         f"backend selection ({e}); this TE version is not supported by "
                         "model.attention_backend=te: install transformer-engine 2.17 or port that module") from None
