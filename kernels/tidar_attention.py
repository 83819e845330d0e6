"""TiDAR block-sparse attention: a FlashAttention-2 style Triton kernel for the doubled draft sequence.

    out = tidar_attention(q, k, v, mask, softmax_scale=None, q_offset=0)

`mask` is a `block_mask.BlockSparseMask`: per-row key ranges and their tile classes (in practice a
`tidar_megatron.layout.TiDARLayout`; this package does not import it).

Tensor layout (batch first, the layout of FlashAttention / SDPA after a transpose of the head axis):
    q    [batch, seq_len - q_offset, q_heads, head_dim]   the queries of rows [q_offset, seq_len)
    k, v [batch, seq_len, kv_heads, head_dim]              keys and values of every row
    out  [batch, seq_len - q_offset, q_heads, head_dim]
Any strides over (batch, sequence, head) are accepted, so a [s, b, h, d] Megatron tensor can be passed as
`x.transpose(0, 1)` without a copy; head_dim must be contiguous (otherwise the input is copied).  Query head
h reads kv head h // (q_heads // kv_heads) (grouped-query attention; KV is never repeated in memory).

Training uses q_offset = 0 with the training layout.  Decoding uses a decoding pass's layout with
q_offset = the number of cached prefix rows: the queries are the pending block and the mask blocks, the
keys are the cache plus those rows.  Gradients are supported in both cases.

Tiles come from `mask.tile_classes` (see tile_tables.py): SKIP tiles are never visited, FULL tiles
run without a mask, PARTIAL tiles apply the element mask from `mask.row_ranges`.  On a GPU the tile
sizes are tuned per shape on first use (see tuning.py); under the Triton interpreter they are fixed at 16.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton

from .block_mask import TILE_SKIP, BlockSparseMask
from .tidar_attention_triton import (
    interpreter_active,
    tidar_attention_bwd_dkdv_kernel,
    tidar_attention_bwd_dq_kernel,
    tidar_attention_fwd_kernel,
)
from .tile_tables import tile_tables
from .tuning import (
    TileConfig,
    backward_dkdv_candidates,
    backward_dq_candidates,
    chosen_config,
    forward_candidates,
    tuned,
)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def skipped_tile_fraction(mask: BlockSparseMask, tile_q: int, tile_k: int, q_offset: int = 0) -> float:
    """Fraction of the (tile_q x tile_k) tiles the kernel would visit without skipping that it skips: all of
    them for training, those of the query tiles from row q_offset on for a decoding step."""
    classes = mask.tile_classes(tile_q, tile_k, q_offset)[q_offset // tile_q:]
    return (classes == TILE_SKIP).float().mean().item()


def unsupported(head_dim: int, device_type: str) -> str | None:
    """Why the kernel cannot run heads of `head_dim` on a `device_type` device here; None when it can."""
    return _head_dim_problem(head_dim) or _device_problem(device_type)


def _head_dim_problem(head_dim: int) -> str | None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        return f"the TiDAR kernel needs a head_dim that is a power of two in [16, 256], got head_dim={head_dim}"
    return None


def _device_problem(device_type: str) -> str | None:
    if device_type == "cpu" and not interpreter_active():
        return ("the TiDAR kernel on the CPU needs Triton's interpreter (TRITON_INTERPRET=1 set before triton is "
                "first imported); on a GPU it runs as is")
    return None


def chosen_tiles(q: torch.Tensor, k: torch.Tensor, mask: BlockSparseMask, q_offset: int = 0) -> dict:
    """{kernel: TileConfig or None} picked by tuning for this shape (None until the kernel has run)."""
    key = _shape_key(q, k, mask, q_offset)
    return {kernel: chosen_config(kernel, key) for kernel in ("forward", "backward_dkdv", "backward_dq")}


def tidar_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                    softmax_scale: float | None = None, q_offset: int = 0) -> torch.Tensor:
    """TiDAR attention of `q` over `k`, `v` under `mask` (shapes in the module docstring)."""
    _check_inputs(q, k, v, mask, q_offset)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    return TiDARAttentionFunction.apply(q, k, v, mask, scale, q_offset)


class TiDARAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: BlockSparseMask, softmax_scale: float, q_offset: int):
        q, k, v = (_unit_last_stride(x) for x in (q, k, v))
        with _on_device_of(q):
            out, lse = _forward(q, k, v, mask, softmax_scale, q_offset)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.softmax_scale, ctx.q_offset = mask, softmax_scale, q_offset
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with _on_device_of(q):
            dq, dk, dv = _backward(q, k, v, out, lse, grad_out, ctx.mask, ctx.softmax_scale, ctx.q_offset)
        return dq, dk, dv, None, None, None


# --- launches ------------------------------------------------------------------------------------------
def _on_device_of(x):
    # Triton launches on the current CUDA device, which need not be the tensors' device.
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _strides(x):  # (batch, sequence, head) strides of a [b, s, h, d] tensor
    return x.stride(0), x.stride(1), x.stride(2)


def _precision(dtype) -> str:
    # fp32 inputs exist for exact tests: keep tl.dot in IEEE fp32 rather than TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


def _launch_options(config: TileConfig) -> dict:
    if interpreter_active():  # the interpreter rejects GPU launch options
        return {}
    return {"num_warps": config.num_warps, "num_stages": config.num_stages}


def _shape_key(q, k, mask, q_offset):
    """The tiles' tuning key.  The attention key count (mask.seq_len) enters rounded up to a power of
    two: a decoding step has one more prefix every pass but the same query count, and must not be
    re-tuned each time (tile validity does not depend on it)."""
    keys_bucket = 1 << max(mask.seq_len - 1, 0).bit_length()
    return (q_offset > 0, q.shape[1], keys_bucket, q.shape[2], k.shape[2], q.shape[-1], q.dtype, q.device)


def _query_tile_launch(mask, config: TileConfig, q_offset: int, batch_heads: int, device):
    """Tile tables, the key tiles each query tile visits, the first query tile that holds queries, and the
    grid of a query-tile kernel (forward, dQ): one program per (query tile, batch x head)."""
    tables = tile_tables(mask, config.block_m, config.block_n, device, q_offset)
    first_q_tile = q_offset // config.block_m
    grid = (triton.cdiv(mask.seq_len, config.block_m) - first_q_tile, batch_heads)
    return tables, tables.keys_of_query_tile, first_q_tile, grid


def _row_args(tables, batch: int) -> tuple:
    """The row-range kernel arguments: the [4, samples, seq_len] tensor, its per-sample stride (0 for a
    layout shared by the batch) and its plane stride."""
    rows = tables.rows
    samples, seq_len = rows.shape[1], rows.shape[2]
    if samples not in (1, batch):
        raise ValueError(f"the mask describes {samples} samples but the batch has {batch}")
    return rows, seq_len if samples > 1 else 0, samples * seq_len


def _forward(q, k, v, mask, softmax_scale, q_offset):
    batch, num_queries, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(batch, q_heads, num_queries, device=q.device, dtype=torch.float32)

    def launch(config: TileConfig):
        tables, visits, first_q_tile, grid = _query_tile_launch(mask, config, q_offset, batch * q_heads,
                                                                q.device)
        tidar_attention_fwd_kernel[grid](
            q, k, v, out, lse, *_row_args(tables, batch),
            visits.index, visits.tile_class, visits.count,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            q_heads, q_heads // k.shape[2], q_offset, num_queries, mask.seq_len, first_q_tile,
            visits.index.shape[1], softmax_scale * math.log2(math.e),
            HEAD_DIM=head_dim, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            PRECISION=_precision(q.dtype), **_launch_options(config))

    tuned("forward", _shape_key(q, k, mask, q_offset), forward_candidates(head_dim), launch)
    return out, lse


def _backward(q, k, v, out, lse, grad_out, mask, softmax_scale, q_offset):
    batch, num_queries, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    if grad_out.stride() != out.stride():
        grad_out = torch.empty_like(out).copy_(grad_out)
    # delta[b, h, i] = sum_d dO * O, the row term of the softmax gradient.
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    dq = torch.empty_like(q)
    scale_log2 = softmax_scale * math.log2(math.e)
    shared = dict(HEAD_DIM=head_dim, PRECISION=_precision(q.dtype))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(out))
    group_size = q_heads // kv_heads
    dk = dv = None

    def launch_dkdv(config: TileConfig):
        nonlocal dk, dv
        tables = tile_tables(mask, config.block_m, config.block_n, q.device, q_offset)
        visits = tables.queries_of_key_tile
        splits = group_size if config.split_kv_groups else 1
        # With splits, each program writes fp32 partial sums for its query head; they are added up below.
        buffer_dtype = k.dtype if splits == 1 else torch.float32
        dk, dv = (torch.empty(batch, mask.seq_len, kv_heads * splits, head_dim, device=k.device,
                              dtype=buffer_dtype) for _ in range(2))
        grid = (triton.cdiv(mask.seq_len, config.block_n), batch * kv_heads * splits)
        tidar_attention_bwd_dkdv_kernel[grid](
            q, k, v, grad_out, lse, delta, dk, dv, *_row_args(tables, batch),
            visits.index, visits.tile_class, visits.count, *strides, *_strides(dk),
            q_heads, kv_heads, group_size, splits, q_offset, num_queries, mask.seq_len,
            visits.index.shape[1], scale_log2, softmax_scale,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, **shared, **_launch_options(config))
        if splits > 1:
            dk, dv = (x.view(batch, mask.seq_len, kv_heads, splits, head_dim).sum(3).to(k.dtype)
                      for x in (dk, dv))

    def launch_dq(config: TileConfig):
        tables, visits, first_q_tile, grid = _query_tile_launch(mask, config, q_offset, batch * q_heads,
                                                                q.device)
        tidar_attention_bwd_dq_kernel[grid](
            q, k, v, grad_out, lse, delta, dq, *_row_args(tables, batch),
            visits.index, visits.tile_class, visits.count, *strides,
            q_heads, q_heads // kv_heads, q_offset, num_queries, mask.seq_len, first_q_tile,
            visits.index.shape[1], scale_log2, softmax_scale,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, **shared, **_launch_options(config))

    key = _shape_key(q, k, mask, q_offset)
    tuned("backward_dkdv", key, backward_dkdv_candidates(head_dim), launch_dkdv)
    tuned("backward_dq", key, backward_dq_candidates(head_dim), launch_dq)
    return dq, dk, dv


# --- validation ----------------------------------------------------------------------------------------
def _unit_last_stride(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_inputs(q, k, v, mask, q_offset):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"tidar_attention expects q, k, v as [batch, seq, heads, head_dim]; got shapes "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, num_queries, q_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[-1] != head_dim:
        raise ValueError(f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch or head_dim")
    if problem := _head_dim_problem(head_dim):
        raise ValueError(f"{problem} (pad the heads, or use the 'flex' or 'local' attention backend)")
    if q_heads % k.shape[2]:
        raise ValueError(f"q_heads={q_heads} is not a multiple of kv_heads={k.shape[2]} (grouped-query "
                         f"attention needs whole groups)")
    if not 0 <= q_offset < mask.seq_len:
        raise ValueError(f"q_offset={q_offset} must lie in [0, seq_len={mask.seq_len}) of the layout")
    if k.shape[1] != mask.seq_len or num_queries != mask.seq_len - q_offset:
        raise ValueError(f"sequence lengths do not match the layout: k/v have {k.shape[1]} rows and q has "
                         f"{num_queries}, the layout needs {mask.seq_len} keys and {mask.seq_len - q_offset} "
                         f"queries (seq_len - q_offset; q_offset={q_offset})")
    if q.dtype not in _SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype among {_SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    if problem := _device_problem(q.device.type):
        raise ValueError(problem)
