"""The chunked linear cross-entropy against the unfused loss: values, gradients, and peak memory."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from tidar_kernels.fused_loss import linear_cross_entropy, tidar_dual_loss
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tidar_megatron.layout import TiDARLayout


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active (CPU or GPU), freed ones subtracted.

    tracemalloc cannot see torch's allocator, so this follows every op's outputs and watches their storages
    with weak references (torch keeps one Python object per live storage, so the callback fires on free)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: not an allocation.
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and id(tensor.untyped_storage()) not in inputs:
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage):
        key = id(storage)
        if key in self._live:
            return
        self._live[key] = weakref.ref(storage, lambda _, key=key, size=storage.nbytes(): self._free(key, size))
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)

    def _free(self, key, size):
        del self._live[key]
        self.current -= size


def unfused_losses(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="none")


def make_problem(rows, hidden_size, vocab, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator) / hidden_size ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    return hidden, weight, targets


@pytest.mark.parametrize("rows,chunk_rows", [(96, 32), (100, 7), (40, 512)])
def test_per_token_losses_and_gradients_match_unfused(rows, chunk_rows):
    hidden, weight, targets = make_problem(rows, 24, 301)
    token_weights = torch.rand(rows)
    losses = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad((losses * token_weights).sum(), (hidden, weight))
    expected = unfused_losses(hidden, weight, targets)
    expected_grads = torch.autograd.grad((expected * token_weights).sum(), (hidden, weight))
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_dual_loss_on_the_doubled_sequence_matches_unfused():
    layout = TiDARLayout.for_training(clean_len=12, block_size=4)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 12), generator=generator)
    labels = torch.randint(0, 50, (2, 12), generator=generator)
    loss_mask = (torch.rand(2, 12, generator=generator) > 0.2).float()
    targets, ar_mask, diff_mask = (x.flatten() for x in layout.training_targets(tokens, labels, loss_mask))
    hidden, weight, _ = make_problem(targets.numel(), 16, 50, seed=2)
    ar_loss, diffusion_loss = tidar_dual_loss(hidden, weight, targets, ar_mask, diff_mask, chunk_rows=10)
    grads = torch.autograd.grad(ar_loss + 0.5 * diffusion_loss, (hidden, weight))
    expected = unfused_losses(hidden, weight, targets)
    expected_ar, expected_diffusion = (expected * ar_mask).sum(), (expected * diff_mask).sum()
    expected_grads = torch.autograd.grad(expected_ar + 0.5 * expected_diffusion, (hidden, weight))
    torch.testing.assert_close(ar_loss, expected_ar)
    torch.testing.assert_close(diffusion_loss, expected_diffusion)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_matches_unfused():
    hidden, weight, targets = make_problem(64, 32, 257, dtype=torch.bfloat16)
    losses = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
    grads = torch.autograd.grad(losses.sum(), (hidden, weight))
    expected = unfused_losses(hidden, weight, targets)
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    torch.testing.assert_close(losses, expected, rtol=1e-2, atol=1e-2)
    for grad, expected_grad in zip(grads, expected_grads):
        assert ((grad.float() - expected_grad.float()).norm() / expected_grad.float().norm()) < 1e-2


def extra_peak_bytes(loss_fn, hidden, weight, targets):
    """Peak tensor memory of forward + backward beyond the gradients that any implementation returns."""
    with PeakTensorMemory() as tracker:
        grads = torch.autograd.grad(loss_fn(hidden, weight, targets).sum(), (hidden, weight))
    return tracker.peak - sum(g.numel() * g.element_size() for g in grads)


# The 1p5b shape: 2L = 8192 rows, V = 151937, hidden 1536, 512-row chunks (16 chunks).  Scaled down by 16
# in rows (and chunk size) and vocabulary, by 16 in hidden size: the ratio extra / logits is preserved.
ROWS, VOCAB, HIDDEN, CHUNK = 8192 // 16, 151937 // 16, 1536 // 16, 512 // 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_within_a_quarter_of_the_fp32_logits(dtype):
    hidden, weight, targets = make_problem(ROWS, HIDDEN, VOCAB, dtype=dtype)
    logits_bytes = ROWS * VOCAB * 4
    fused = extra_peak_bytes(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_rows=CHUNK), hidden, weight, targets)
    unfused = extra_peak_bytes(unfused_losses, hidden, weight, targets)
    assert unfused >= logits_bytes  # the tracker does see the logits
    print(f"{dtype}: extra peak memory / fp32 logits: fused {fused / logits_bytes:.3f}, "
          f"unfused {unfused / logits_bytes:.3f}")
    assert fused <= logits_bytes / 4, f"fused extra {fused / logits_bytes:.3f} x the fp32 logits"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_on_gpu_at_the_1p5b_shape():
    hidden, weight, targets = (x.detach().cuda() for x in make_problem(8192, 1536, 151937, dtype=torch.bfloat16))
    hidden.requires_grad_(), weight.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets).sum(), (hidden, weight))
    extra = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)
    assert extra <= 8192 * 151937 * 4 / 4, f"extra {extra / 2**30:.2f} GiB"


def _vocab_parallel_rank(rank, world_size, init_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        hidden, weight, targets = make_problem(48, 16, 302, seed=4)  # every rank builds the same problem
        token_weights = torch.rand(48, generator=torch.Generator().manual_seed(5))
        shard = weight.shape[0] // world_size
        local_weight = weight.detach()[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        losses = linear_cross_entropy(hidden, local_weight, targets, chunk_rows=20,
                                      tp_group=dist.group.WORLD, vocab_start=rank * shard)
        grad_hidden, grad_local_weight = torch.autograd.grad((losses * token_weights).sum(), (hidden, local_weight))
        dist.all_reduce(grad_hidden)  # what copy_to_tensor_model_parallel_region's backward does

        expected = unfused_losses(hidden, weight, targets)
        expected_hidden, expected_weight = torch.autograd.grad((expected * token_weights).sum(), (hidden, weight))
        torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad_hidden, expected_hidden, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_local_weight, expected_weight[rank * shard:(rank + 1) * shard],
                                   rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_vocab_parallel_matches_unfused_on_two_gloo_ranks(tmp_path):
    # torch's spawn rather than multirank.run_on_ranks: that helper's teardown imports megatron.core in every
    # rank (10-30 s on a shared CI box), which this torch-only test does not need.
    torch.multiprocessing.spawn(_vocab_parallel_rank, args=(2, str(tmp_path / "init")), nprocs=2)
