"""Triton programs of the TiDAR attention kernel (FlashAttention-2 style); the host side is tidar_attention.py.

Conventions shared by all three programs:
  * rows are *layout* rows: a query tile covers layout rows [t*BLOCK_M, (t+1)*BLOCK_M), the queries present
    are rows [q_offset, seq_len) (q_offset > 0 only for decoding), so query index = row - q_offset;
  * tensors are addressed as [batch, sequence, head, head_dim] through (batch, sequence, head) strides with
    a unit head_dim stride;
  * scores are kept in log2 units (scaled by softmax_scale * log2(e)) so the softmax uses exp2, and the
    saved log-sum-exp LSE [batch, q_heads, num_queries] fp32 is in the same units;
  * only PARTIAL tiles evaluate the element mask, from the mask's row ranges: the keys visible to row r
    are [clean_lo[r], clean_end[r]) and [block_lo[r], block_hi[r]), read from `Rows`, an int32
    [4, samples, seq_len] tensor (planes clean_lo, clean_end, block_lo, block_hi) at sample `batch` (or
    sample 0 for every batch element when `rows_stride_b` is 0: a layout shared by the batch).  Rows
    outside [q_offset, seq_len) load empty ranges and zero inputs, so they never contribute.
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .block_mask import TILE_PARTIAL

PARTIAL_TILE = tl.constexpr(TILE_PARTIAL)


@triton.jit
def _mask_partial(scores, tile_class, cols, clean_lo, clean_end, block_lo, block_hi, fill):
    if tile_class == PARTIAL_TILE:
        key = cols[None, :]
        visible = (((key >= clean_lo[:, None]) & (key < clean_end[:, None]))
                   | ((key >= block_lo[:, None]) & (key < block_hi[:, None])))
        scores = tl.where(visible, scores, fill)
    return scores


@triton.jit
def _query_tile_program(first_q_tile, num_q_heads, group_size):
    """The query tile and (batch, head) owned by this program of a query-tile kernel (forward, dQ)."""
    q_tile = first_q_tile + tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_q_heads).to(tl.int64)  # batch offsets can pass 2**31 elements
    head = batch_head % num_q_heads
    return q_tile, batch_head, batch, head, head // group_size


@triton.jit
def _query_rows(q_tile, q_offset, seq_len, Rows, batch, rows_stride_b, rows_plane, BLOCK_M: tl.constexpr):
    """Layout rows of query tile `q_tile`: which are real queries (rows before `q_offset` are cached
    prefix), their query index, and their visible key ranges (the mask's `row_ranges`) for `batch`."""
    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = (rows >= q_offset) & (rows < seq_len)
    base = Rows + batch * rows_stride_b + rows
    clean_lo = tl.load(base, mask=row_ok, other=0)
    clean_end = tl.load(base + rows_plane, mask=row_ok, other=0)
    block_lo = tl.load(base + 2 * rows_plane, mask=row_ok, other=0)
    block_hi = tl.load(base + 3 * rows_plane, mask=row_ok, other=0)
    return rows, row_ok, rows - q_offset, clean_lo, clean_end, block_lo, block_hi


@triton.jit
def _visited_key_tile(KeyTileIndex, KeyTileClass, entry, k_base, v_base, k_stride_s, v_stride_s, dims,
                      seq_len, BLOCK_N: tl.constexpr):
    """Entry `entry` of a query tile's visit list: the key tile's class, its key columns, and its keys and
    values (columns past seq_len read as zeros)."""
    k_tile = tl.load(KeyTileIndex + entry)
    tile_class = tl.load(KeyTileClass + entry)
    cols = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_len
    k = tl.load(k_base + cols[:, None] * k_stride_s + dims[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(v_base + cols[:, None] * v_stride_s + dims[None, :], mask=col_ok[:, None], other=0.0)
    return tile_class, cols, k, v


@triton.jit
def tidar_attention_fwd_kernel(
    Q, K, V, Out, LSE,
    Rows, rows_stride_b, rows_plane,
    KeyTileIndex, KeyTileClass, KeyTileCount,
    q_stride_b, q_stride_s, q_stride_h,
    k_stride_b, k_stride_s, k_stride_h,
    v_stride_b, v_stride_s, v_stride_h,
    o_stride_b, o_stride_s, o_stride_h,
    num_q_heads, group_size, q_offset, num_queries, seq_len, first_q_tile, num_k_tiles,
    scale_log2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    q_tile, batch_head, batch, head, kv_head = _query_tile_program(first_q_tile, num_q_heads, group_size)
    rows, row_ok, queries, clean_lo, clean_end, block_lo, block_hi = _query_rows(
        q_tile, q_offset, seq_len, Rows, batch, rows_stride_b, rows_plane, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + batch * q_stride_b + head * q_stride_h + queries[:, None] * q_stride_s + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + batch * k_stride_b + kv_head * k_stride_h
    v_base = V + batch * v_stride_b + kv_head * v_stride_h

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    table = q_tile * num_k_tiles
    for i in range(0, tl.load(KeyTileCount + q_tile)):
        tile_class, cols, k, v = _visited_key_tile(KeyTileIndex, KeyTileClass, table + i, k_base, v_base,
                                                   k_stride_s, v_stride_s, dims, seq_len, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        scores = _mask_partial(scores, tile_class, cols, clean_lo, clean_end, block_lo, block_hi, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A row can see nothing yet (padding rows, or a partial tile before its first visible key): keep
        # exp2 away from (-inf) - (-inf).
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.exp2(scores - safe_max[:, None])
        rescale = tl.exp2(running_max - safe_max)
        running_sum = running_sum * rescale + tl.sum(p, 1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        running_max = new_max

    running_sum = tl.where(running_sum == 0.0, 1.0, running_sum)
    out = acc / running_sum[:, None]
    tl.store(Out + batch * o_stride_b + head * o_stride_h + queries[:, None] * o_stride_s + dims[None, :],
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + batch_head * num_queries + queries, running_max + tl.log2(running_sum), mask=row_ok)


@triton.jit
def tidar_attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV,
    Rows, rows_stride_b, rows_plane,
    QueryTileIndex, QueryTileClass, QueryTileCount,
    q_stride_b, q_stride_s, q_stride_h,
    k_stride_b, k_stride_s, k_stride_h,
    v_stride_b, v_stride_s, v_stride_h,
    o_stride_b, o_stride_s, o_stride_h,
    dkv_stride_b, dkv_stride_s, dkv_stride_h,
    num_q_heads, num_kv_heads, group_size, group_splits, q_offset, num_queries, seq_len, num_q_tiles,
    scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key tile, batch, kv head, split of its GQA group): it sums over the query heads of
    its split, so K/V are never repeated and no atomics are needed.  DK / DV are [b, s, kv_heads *
    group_splits, d]: with one split the gradients themselves, otherwise partial sums that the host adds
    up (more programs when the key tiles alone cannot fill the GPU)."""
    k_tile = tl.program_id(0)
    split = tl.program_id(1) % group_splits
    kv_head = (tl.program_id(1) // group_splits) % num_kv_heads
    batch = (tl.program_id(1) // (group_splits * num_kv_heads)).to(tl.int64)  # offsets can pass 2**31

    cols = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seq_len
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(K + batch * k_stride_b + kv_head * k_stride_h + cols[:, None] * k_stride_s + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    v = tl.load(V + batch * v_stride_b + kv_head * v_stride_h + cols[:, None] * v_stride_s + dims[None, :],
                mask=col_ok[:, None], other=0.0)
    dk = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, HEAD_DIM], 0.0, tl.float32)
    heads_per_split = group_size // group_splits

    table = k_tile * num_q_tiles
    for i in range(0, tl.load(QueryTileCount + k_tile)):
        q_tile = tl.load(QueryTileIndex + table + i)
        tile_class = tl.load(QueryTileClass + table + i)
        rows, row_ok, queries, clean_lo, clean_end, block_lo, block_hi = _query_rows(
            q_tile, q_offset, seq_len, Rows, batch, rows_stride_b, rows_plane, BLOCK_M)
        for g in range(0, heads_per_split):
            head = kv_head * group_size + split * heads_per_split + g
            batch_head = batch * num_q_heads + head
            q = tl.load(Q + batch * q_stride_b + head * q_stride_h + queries[:, None] * q_stride_s
                        + dims[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(DO + batch * o_stride_b + head * o_stride_h + queries[:, None] * o_stride_s
                         + dims[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + batch_head * num_queries + queries, mask=row_ok, other=0.0)
            delta = tl.load(Delta + batch_head * num_queries + queries, mask=row_ok, other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
            p = tl.exp2(scores - lse[:, None])
            p = _mask_partial(p, tile_class, cols, clean_lo, clean_end, block_lo, block_hi, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    out_offsets = (batch * dkv_stride_b + (kv_head * group_splits + split) * dkv_stride_h
                   + cols[:, None] * dkv_stride_s + dims[None, :])
    tl.store(DK + out_offsets, (dk * softmax_scale).to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def tidar_attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ,
    Rows, rows_stride_b, rows_plane,
    KeyTileIndex, KeyTileClass, KeyTileCount,
    q_stride_b, q_stride_s, q_stride_h,
    k_stride_b, k_stride_s, k_stride_h,
    v_stride_b, v_stride_s, v_stride_h,
    o_stride_b, o_stride_s, o_stride_h,
    num_q_heads, group_size, q_offset, num_queries, seq_len, first_q_tile, num_k_tiles,
    scale_log2, softmax_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    q_tile, batch_head, batch, head, kv_head = _query_tile_program(first_q_tile, num_q_heads, group_size)
    rows, row_ok, queries, clean_lo, clean_end, block_lo, block_hi = _query_rows(
        q_tile, q_offset, seq_len, Rows, batch, rows_stride_b, rows_plane, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q_offsets = batch * q_stride_b + head * q_stride_h + queries[:, None] * q_stride_s + dims[None, :]
    q = tl.load(Q + q_offsets, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + batch * o_stride_b + head * o_stride_h + queries[:, None] * o_stride_s + dims[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + batch_head * num_queries + queries, mask=row_ok, other=0.0)
    delta = tl.load(Delta + batch_head * num_queries + queries, mask=row_ok, other=0.0)
    k_base = K + batch * k_stride_b + kv_head * k_stride_h
    v_base = V + batch * v_stride_b + kv_head * v_stride_h

    dq = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    table = q_tile * num_k_tiles
    for i in range(0, tl.load(KeyTileCount + q_tile)):
        tile_class, cols, k, v = _visited_key_tile(KeyTileIndex, KeyTileClass, table + i, k_base, v_base,
                                                   k_stride_s, v_stride_s, dims, seq_len, BLOCK_N)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        p = tl.exp2(scores - lse[:, None])
        p = _mask_partial(p, tile_class, cols, clean_lo, clean_end, block_lo, block_hi, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(DQ + q_offsets, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter.  TRITON_INTERPRET=1 must be set before triton is
    first imported (its language library is built at import time), so checking the variable is not enough."""
    return all(isinstance(fn, InterpretedFunction) for fn in (tl.sum, tidar_attention_fwd_kernel))
