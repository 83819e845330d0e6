"""Attention backends for the TiDAR layout, plugged into Megatron-core through the layer spec.

    local   Megatron's DotProductAttention with AttnMaskType.arbitrary and the layout's dense mask
            (a `causal` spec would silently ignore the mask).  O(S^2) memory; the reference backend.
    flex    torch FlexAttention with a BlockMask from the layout's mask_mod (compiled on GPU; on CPU it
            has a forward only).
    te      TransformerEngine: the layout's mask as a post-scale bias with `no_mask`, the route that keeps
            cuDNN FusedAttention eligible (TE's `arbitrary` mask always falls back to unfused attention).
    kernel  our Triton block-sparse kernel (tidar_kernels), which skips fully masked tiles.

Every backend takes its mask from the `TiDARLayout` the model's forward is given (`layout_as_mask`), as
Megatron's `attention_mask` argument: `local` the dense mask, `flex` and `kernel` the layout's tensor
encoding (`TiDARLayout.to_tensor`), decoded back to the (cached) layout in core attention; `te` a post-scale
bias through `attention_bias`.  Nothing is carried in a global or context variable, so a forward that
Megatron re-runs for activation recompute, outside any context of ours, applies the same mask.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from tidar_megatron.compat.te_attention import selected_attention_backends
from tidar_megatron.errors import TiDARError
from tidar_megatron.layout import TiDARLayout

# TransformerEngine and apex (optional extras) and the Triton kernels (compiled on first use) are imported
# where they are used.


class BackendUnavailable(TiDARError, RuntimeError):
    pass


def layout_as_mask(backend: str, layout: TiDARLayout, device) -> torch.Tensor | None:
    """What `backend` takes as Megatron's attention_mask for `layout` (te: None, its bias goes separately)."""
    if backend == "local":  # packed documents: a new layout every batch, not worth caching
        return layout.megatron_mask(device) if layout.documents else _megatron_mask(layout, device)
    if backend in ("flex", "kernel"):
        return layout.to_tensor()  # stays on the CPU: only decoded, never read by a kernel
    return None


@functools.lru_cache(maxsize=4)
def _megatron_mask(layout: TiDARLayout, device) -> torch.Tensor:
    return layout.megatron_mask(device)


class _LayoutAttention(MegatronModule):
    """Core attention that takes the TiDAR layout as its attention_mask (`TiDARLayout.to_tensor`).  Megatron
    calls it with q [s, b, np, hn] and k, v [s, b, ng, hn] (heads of this TP rank) and expects
    [s, b, np * hn]."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError("packed sequences are not supported by the TiDAR attention backends")
        if attention_mask is None or attention_mask.dtype != torch.long:
            raise ValueError("the flex and kernel backends take the TiDAR layout as attention_mask "
                             "(TiDARLayout.to_tensor()); call TiDARModel with layout=...")
        layout = TiDARLayout.from_tensor(attention_mask)
        if layout.seq_len != query.shape[0]:
            raise ValueError(f"the layout covers {layout.seq_len} tokens but the sequence has {query.shape[0]}")
        out = self.attend(query, key, value, layout)  # [s, b, np, hn]
        return out.reshape(out.shape[0], out.shape[1], -1)


class FlexTiDARAttention(_LayoutAttention):
    def attend(self, query, key, value, layout):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, h, s, d]
        fn = _compiled_flex_attention() if q.is_cuda else flex_attention
        out = fn(q, k, v, block_mask=_block_mask(layout, q.device), scale=self.softmax_scale,
                 enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3)


@functools.lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _block_mask(layout: TiDARLayout, device):
    return create_block_mask(layout.mask_mod(device), layout.batch_size, None, layout.seq_len, layout.seq_len,
                             device=device)


class KernelTiDARAttention(_LayoutAttention):
    def attend(self, query, key, value, layout):
        from tidar_kernels.tidar_attention import tidar_attention

        q, k, v = (t.transpose(0, 1) for t in (query, key, value))  # [b, s, h, d]
        out = tidar_attention(q, k, v, layout, softmax_scale=self.softmax_scale)
        return out.transpose(0, 1)


def check_backend_available(backend: str, on_gpu: bool):
    """Fail at start-up, with the fix, when a requested backend cannot run here."""
    if backend == "te":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except Exception as e:  # TE raises OSError/ImportError variants when its CUDA libs are missing
            raise BackendUnavailable("model.attention_backend=te needs TransformerEngine "
                                     f"(pip install '.[te]' on a CUDA machine): {e}") from None
        if not on_gpu:
            raise BackendUnavailable("model.attention_backend=te needs a CUDA device; use local on CPU")
    if backend == "kernel":
        try:
            import tidar_kernels.tidar_attention  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(f"model.attention_backend=kernel: tidar_kernels not importable ({e}); "
                                     "reinstall the package with pip install -e .") from None


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def apex_available() -> bool:
    try:
        import apex.normalization  # noqa: F401  (NVIDIA apex from a cluster image, never the PyPI "apex")
    except Exception:
        return False
    return True


def layer_spec(backend: str, qk_layernorm: bool, normalization: str) -> ModuleSpec:
    """The GPT layer spec with TiDAR attention swapped in (the rest of the layer is Megatron's).

    With TransformerEngine on a GPU the layer is TE's (fused norm+linear, needed for sequence parallelism
    without apex) whatever the attention backend; otherwise Megatron's local layer."""
    if backend == "te" or te_available():
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization)
    spec = copy.deepcopy(spec)
    attn = spec.submodules.self_attention
    if backend == "local":
        attn.params["attn_mask_type"] = AttnMaskType.arbitrary
        attn.submodules.core_attention = DotProductAttention  # Megatron's own, also under the TE layer
    elif backend == "te":
        attn.params["attn_mask_type"] = AttnMaskType.no_mask  # the mask travels as attention_bias
    else:
        module = {"flex": FlexTiDARAttention, "kernel": KernelTiDARAttention}[backend]
        attn.params["attn_mask_type"] = AttnMaskType.no_mask
        attn.submodules.core_attention = module
    return spec


def assert_te_fused_backend():
    """After a TE forward: fail unless TE ran its fused (cuDNN) attention.  TE silently falls back to
    unfused O(S^2) attention when no fused kernel accepts the inputs (TE issue #3006); for the TiDAR
    bias that would be both slow and memory-hungry, so say so instead of training on."""
    selected = selected_attention_backends()
    if not selected.get("use_fused_attention"):
        chosen = "flash" if selected.get("use_flash_attention") else "unfused"
        raise BackendUnavailable(f"TransformerEngine chose {chosen} attention for the TiDAR bias, not fused "
                                 "(cuDNN) attention; run with NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=2 to see why, or use "
                                 "model.attention_backend=kernel")


def te_attention_bias(layout: TiDARLayout, dtype: torch.dtype, device) -> torch.Tensor:
    """[1 or batch, 1, S, S] post-scale bias: 0 where allowed, a large negative number elsewhere (TE's own
    recipe in docs/examples/attention/arbitrary_mask_to_post_scale_bias.py).  Cached for shared layouts."""
    return _te_bias(layout, dtype, device) if not layout.documents else _te_bias.__wrapped__(layout, dtype, device)


@functools.lru_cache(maxsize=4)
def _te_bias(layout: TiDARLayout, dtype: torch.dtype, device) -> torch.Tensor:
    neg = -(2.0 ** 50) if dtype == torch.bfloat16 else -(2.0 ** 15)
    return torch.where(~layout.megatron_mask(device), 0.0, neg).to(dtype)
