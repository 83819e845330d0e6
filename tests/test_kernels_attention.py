"""The TiDAR attention kernel against SDPA with the layout's dense mask.

Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py switches it on before triton
is imported).  Interpreter shapes are small (head dims 16 / 32, tiles of 16); head dims 64 / 128 are covered
by the GPU tests, and the compiled kernels' shared-memory use for Hopper by a compile-only check in a process
without the interpreter.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
import triton
from tidar_kernels.tidar_attention import tidar_attention
from tidar_kernels.tidar_attention_triton import interpreter_active

from tidar_megatron.layout import TiDARLayout

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def reference_attention(q, k, v, layout, q_offset=0, softmax_scale=None):
    """SDPA with the layout's dense mask (True = keep), KV heads repeated for GQA; [b, s, h, d] in and out."""
    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    mask = layout.dense_mask(q.device)[..., q_offset:, :]
    mask = mask[:, None] if mask.dim() == 3 else mask  # packed documents: one mask per sample
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=softmax_scale)
    return out.transpose(1, 2)


def max_relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def norm_relative_error(actual, expected):
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def random_qkv(batch, num_queries, seq_len, q_heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def make(rows, heads):
        x = torch.randn(batch, rows, heads, head_dim, generator=generator)
        return x.to(device=DEVICE, dtype=dtype).requires_grad_()

    return make(num_queries, q_heads), make(seq_len, kv_heads), make(seq_len, kv_heads)


def compare_with_reference(layout, q, k, v, q_offset=0, softmax_scale=None, error=max_relative_error):
    """Errors of the output and of dQ, dK, dV against the reference, for the same upstream gradient."""
    out = tidar_attention(q, k, v, layout, softmax_scale=softmax_scale, q_offset=q_offset)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    reference_inputs = [x.detach().float().requires_grad_() for x in (q, k, v)]
    expected = reference_attention(*reference_inputs, layout, q_offset, softmax_scale)
    expected_grads = torch.autograd.grad(expected, reference_inputs, grad_out.float())
    names = ("out", "dq", "dk", "dv")
    return {n: error(a, e) for n, a, e in zip(names, (out, *grads), (expected, *expected_grads))}


# (clean_len, block_size, q_heads, kv_heads, head_dim): seq_len = 2 * clean_len; 42 and 40 are not multiples
# of the 16-row tiles, 21 / 4 leaves a short last block, 24 / 16 a block wider than half the sequence.
TRAINING_CASES = [
    (24, 4, 4, 2, 16),
    (20, 4, 2, 2, 32),
    (21, 4, 6, 2, 16),
    (24, 16, 2, 1, 32),
    (40, 16, 4, 4, 16),
]


@pytest.mark.parametrize("clean_len,block_size,q_heads,kv_heads,head_dim", TRAINING_CASES)
def test_training_layout_matches_sdpa(clean_len, block_size, q_heads, kv_heads, head_dim):
    layout = TiDARLayout.for_training(clean_len, block_size)
    q, k, v = random_qkv(2, layout.seq_len, layout.seq_len, q_heads, kv_heads, head_dim)
    errors = compare_with_reference(layout, q, k, v)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("attention", [True, False])
def test_packed_documents_match_sdpa(attention):
    """Per-sample row ranges (document cuts inside blocks, a document shorter than a block) and the tile
    classes that hold for every sample of the batch."""
    layout = TiDARLayout.for_training(24, 8).with_documents([(3, 10), (), (17, 18, 20)], attention=attention)
    q, k, v = random_qkv(3, layout.seq_len, layout.seq_len, 4, 2, 16, seed=5)
    errors = compare_with_reference(layout, q, k, v)
    assert max(errors.values()) <= 1e-4, errors


def test_strided_megatron_inputs_and_custom_scale():
    """[s, b, h, d] tensors passed as transposed views (no copy), a non-default softmax scale."""
    layout = TiDARLayout.for_training(24, 8)
    q, k, v = (x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
               for x in random_qkv(2, 48, 48, 4, 2, 16, seed=1))
    assert q.stride(1) != q.shape[2] * q.shape[3]
    errors = compare_with_reference(layout, q, k, v, softmax_scale=0.3)
    assert max(errors.values()) <= 1e-4, errors


@pytest.mark.parametrize("prefix_len,block_size", [(20, 4), (7, 3)])
def test_decoding_layout_matches_sdpa(prefix_len, block_size):
    """Queries are the rows after the cached prefix (q_offset = prefix_len; 7 is not tile aligned)."""
    layout = TiDARLayout.for_decoding(prefix_len, block_size)
    q, k, v = random_qkv(2, layout.seq_len - prefix_len, layout.seq_len, 4, 2, 16, seed=2)
    errors = compare_with_reference(layout, q, k, v, q_offset=prefix_len)
    assert max(errors.values()) <= 1e-4, errors


def test_float16_matches_sdpa():
    """Half precision with fp32 accumulation.  (bf16 is GPU-only: the interpreter's bf16 tl.dot is wrong.)"""
    layout = TiDARLayout.for_training(21, 4)
    q, k, v = random_qkv(1, layout.seq_len, layout.seq_len, 4, 2, 32, dtype=torch.float16, seed=4)
    errors = compare_with_reference(layout, q, k, v, error=norm_relative_error)
    assert max(errors.values()) <= 1e-2, errors


def test_backward_with_kv_groups_split_across_programs(monkeypatch):
    """The dK/dV variant with one program per query head (fp32 partial sums added on the host)."""
    import tidar_kernels.tidar_attention as attention
    from tidar_kernels import tuning

    split_only = lambda head_dim: [replace(c, split_kv_groups=True) for c in tuning.backward_dkdv_candidates(head_dim)]
    monkeypatch.setattr(attention, "backward_dkdv_candidates", split_only)
    monkeypatch.setattr(tuning, "_chosen", {})
    layout = TiDARLayout.for_training(21, 4)
    q, k, v = random_qkv(2, layout.seq_len, layout.seq_len, 6, 2, 16, seed=3)
    errors = compare_with_reference(layout, q, k, v)
    assert max(errors.values()) <= 1e-4, errors


def test_kernels_compile_for_hopper_within_shared_memory():
    """The interpreter cannot catch compiled-mode errors: compile (no launch) for sm_90 at the 1p5b / 8b
    head dim in bf16, with the first tuning candidate of each kernel, in a process without the interpreter."""
    from multirank import run_on_ranks

    shared = run_on_ranks(1, _compile_for_hopper, env={"TRITON_INTERPRET": "0"}, timeout=300)[0]
    for name, nbytes in shared.items():
        assert nbytes <= 227 * 1024, (name, nbytes)


def _compile_for_hopper(rank, world_size) -> dict:
    assert not interpreter_active()
    from tidar_kernels import tidar_attention_triton as kernels
    from tidar_kernels import tuning
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    shared = {}
    pointer_types = {name: "*bf16" for name in ("Q", "K", "V", "Out", "DO", "DQ")}
    pointer_types.update({name: "*fp32" for name in ("LSE", "Delta", "DK", "DV")})  # split dK/dV buffers
    pointer_types.update({name: "*i8" for name in ("KeyTileClass", "QueryTileClass")})
    for kernel, candidates in ((kernels.tidar_attention_fwd_kernel, tuning.forward_candidates),
                               (kernels.tidar_attention_bwd_dkdv_kernel, tuning.backward_dkdv_candidates),
                               (kernels.tidar_attention_bwd_dq_kernel, tuning.backward_dq_candidates)):
        config = candidates(128)[0]
        constants = {"HEAD_DIM": 128, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "PRECISION": "tf32"}
        signature = {name: "constexpr" if name in constants else pointer_types.get(name, "*i32")
                     if name[0].isupper() else "fp32" if "scale" in name else "i32" for name in kernel.arg_names}
        constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
        source = ASTSource(kernel, signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
        shared[kernel.fn.__name__] = compiled.metadata.shared
    return shared


@pytest.mark.parametrize("q_shape,kv_shape,message", [
    ((1, 48, 2, 24), (1, 48, 2, 24), "power of two"),
    ((1, 48, 2, 512), (1, 48, 2, 512), "power of two"),
    ((1, 48, 3, 16), (1, 48, 2, 16), "multiple of kv_heads"),
    ((1, 40, 2, 16), (1, 40, 2, 16), "do not match the layout"),
])
def test_unsupported_shapes_raise(q_shape, kv_shape, message):
    layout = TiDARLayout.for_training(24, 4)
    q, k = torch.zeros(q_shape), torch.zeros(kv_shape)
    with pytest.raises(ValueError, match=message):
        tidar_attention(q, k, k, layout)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clean_len,block_size,q_heads,kv_heads,head_dim", [
    (512, 16, 12, 2, 128), (300, 16, 8, 8, 64), (256, 8, 32, 8, 128)])
def test_half_precision_on_gpu(dtype, clean_len, block_size, q_heads, kv_heads, head_dim):
    layout = TiDARLayout.for_training(clean_len, block_size)
    q, k, v = random_qkv(2, layout.seq_len, layout.seq_len, q_heads, kv_heads, head_dim, dtype=dtype)
    errors = compare_with_reference(layout, q, k, v, error=norm_relative_error)
    assert max(errors.values()) <= 1e-2, errors


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_decoding_bf16_on_gpu():
    layout = TiDARLayout.for_decoding(1000, 16)
    q, k, v = random_qkv(1, layout.seq_len - 1000, layout.seq_len, 12, 2, 128, dtype=torch.bfloat16)
    errors = compare_with_reference(layout, q, k, v, q_offset=1000, error=norm_relative_error)
    assert max(errors.values()) <= 1e-2, errors
