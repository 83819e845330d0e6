"""Memory-lean output projection + cross-entropy for the doubled TiDAR sequence (AR and diffusion halves).

Why our own and not a library's (the issue asks to reuse one where it fits):
  * megatron-core's fused (vocab-parallel) cross-entropy takes the logits as input, so the [2L, V] logits
    still exist; it saves the softmax copy, not the logits.
  * Liger-Kernel's fused linear cross-entropy never materialises the logits, but it computes the gradients
    inside the forward for a mean/sum reduction with per-*class* weights only; the TiDAR loss needs
    per-*token* weights (the AR and diffusion loss masks, weighted separately), and Liger is not
    vocab-parallel.
So this is a chunked torch autograd.Function: the forward computes logits one chunk of rows at a time and
keeps only the per-row log-sum-exp; the backward recomputes each chunk's logits (one extra GEMM per chunk,
the price of never holding them) and turns them into the softmax gradient in place.  The matmuls stay in
cuBLAS; no custom kernel is needed for this to be memory-lean.

Extra memory beyond inputs and gradients: one [chunk_rows, V] logits chunk in fp32 (plus its compute-dtype
GEMM output when hidden is bf16/fp16) and O(n) per-row vectors.  At the 1p5b shape (2L = 8192 rows,
V = 151937, the default 512-row chunks) that is 1/16 (fp32) to 3/32 (bf16) of the 2L x V fp32 logits,
within the 1/4 target (measured at a proportionate shape in tests/test_kernels_fused_loss.py).  The
weight gradient is accumulated chunk by chunk in the weight's dtype with addmm (cuBLAS accumulates each
chunk in fp32), as Liger does.

Vocab-parallel (tensor parallel): pass `tp_group` and this rank's vocab shard of the weight [V / tp, h] with
`vocab_start` its first id.  Per-row max, sum-exp and target logit are all-reduced over the group.  Like
Megatron's ColumnParallelLinear, the returned hidden gradient is this rank's partial sum: wrap `hidden` in
`copy_to_tensor_model_parallel_region` (or `gather_from_sequence_parallel_region` under sequence
parallelism) exactly as Megatron's output layer does, and that region's backward reduces it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK_ROWS = 512


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = DEFAULT_CHUNK_ROWS, tp_group=None, vocab_start: int = 0
                         ) -> torch.Tensor:
    """Per-token cross-entropy of logits = hidden @ weight.T, without materialising the logits.

    hidden [n, h]; weight [V, h] (or this rank's [V / tp, h] shard with `tp_group`); targets [n] int64
    vocabulary ids (every id valid: mask tokens out through their loss weight, not an ignore index).
    Returns [n] fp32 losses; differentiable w.r.t. hidden and weight."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [n, h] and weight [V, h]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [n]={hidden.shape[0]} ids, got shape {tuple(targets.shape)}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, tp_group, vocab_start)


def tidar_dual_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ar_weight: torch.Tensor, diffusion_weight: torch.Tensor,
                    chunk_rows: int = DEFAULT_CHUNK_ROWS, tp_group=None, vocab_start: int = 0):
    """(AR loss sum, diffusion loss sum) over the doubled sequence in one pass over the vocabulary.

    hidden [n, h] (n = batch * 2L, any row order), targets [n], ar_weight / diffusion_weight [n] per-token
    weights (`TiDARLayout.training_targets`' ar_mask and diff_mask, flattened the same way as hidden).
    Normalising (by token counts or otherwise) is left to the caller."""
    losses = linear_cross_entropy(hidden, weight, targets, chunk_rows, tp_group, vocab_start)
    return (losses * ar_weight.float()).sum(), (losses * diffusion_weight.float()).sum()


def _all_reduce(tensor, op, group):
    if group is not None:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _local_targets(targets, vocab_start, local_vocab):
    """Targets as indices into this rank's vocab shard, and which rows' targets live on this rank."""
    local = targets - vocab_start
    on_rank = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), on_rank


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, tp_group, vocab_start):
        local_targets, on_rank = _local_targets(targets, vocab_start, weight.shape[0])
        lse = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
        losses = torch.empty_like(lse)
        for rows in _chunks(hidden.shape[0], chunk_rows):
            logits = (hidden[rows] @ weight.t()).float()  # [chunk, V]: the only vocab-sized buffer
            row_max = _all_reduce(logits.max(dim=1).values, dist.ReduceOp.MAX, tp_group)
            target_logit = logits.gather(1, local_targets[rows, None]).squeeze(1) * on_rank[rows]
            logits.sub_(row_max[:, None]).exp_()
            sums = _all_reduce(torch.stack([logits.sum(dim=1), target_logit]), dist.ReduceOp.SUM, tp_group)
            lse[rows] = row_max + sums[0].log()
            losses[rows] = lse[rows] - sums[1]
            del logits  # before the next chunk's GEMM, or two chunks are alive at once
        ctx.save_for_backward(hidden, weight, local_targets, on_rank, lse)
        ctx.chunk_rows = chunk_rows
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        hidden, weight, local_targets, on_rank, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_losses = grad_losses.float()
        for rows in _chunks(hidden.shape[0], ctx.chunk_rows):
            # d loss / d logits = softmax - onehot(target), built in place in the recomputed logits.
            grad_logits = (hidden[rows] @ weight.t()).float()
            grad_logits.sub_(lse[rows, None]).exp_()
            chunk_rows = torch.arange(grad_logits.shape[0], device=grad_logits.device)
            grad_logits[chunk_rows, local_targets[rows]] -= on_rank[rows].float()
            grad_logits.mul_(grad_losses[rows, None])
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), hidden[rows])
            del grad_logits  # before the next chunk's GEMM, or two chunks are alive at once
        return grad_hidden, grad_weight, None, None, None, None


def _chunks(n, chunk_rows):
    return (slice(start, min(start + chunk_rows, n)) for start in range(0, n, chunk_rows))
