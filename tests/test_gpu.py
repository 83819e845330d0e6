"""GPU-only checks (skipped without CUDA): the backend and parity tests in bf16 (tolerance 1e-2), and the
TransformerEngine backend when TransformerEngine is installed."""

import pytest
import torch
import torch.nn.functional as F
from multirank import run_on_ranks

pytestmark = pytest.mark.gpu
L, B, VOCAB = 64, 16, 128


def _backends_bf16(rank, world_size, backends):
    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.model import build_model
    from tidar_megatron.training import distributed

    def cfg(backend):
        return load_config("tiny", ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B),
                                    "--model.vocab_size", str(VOCAB), "--train.bf16", "true",
                                    "--model.attention_backend", backend, "--model.kv_channels", "64"])

    distributed.initialize(cfg("local"))
    layout = TiDARLayout.for_training(L, B)
    windows = torch.randint(0, VOCAB, (2, L + 1), generator=torch.Generator().manual_seed(0))
    batch = {k: v.cuda() for k, v in from_token_windows(layout, windows, VOCAB).items()}
    out, state = {}, None
    for backend in backends:
        model = build_model(cfg(backend), on_gpu=True)[0].cuda()
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)
        loss = model(batch["input_ids"], batch["position_ids"], labels=batch["targets"])
        loss.float().mean().backward()
        out[backend] = (loss.float().cpu(), {n: p.grad.float().cpu() for n, p in model.named_parameters()})
    return out


def _sdpa_core(rank, world_size):
    from tidar_megatron.config import load_config
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.model import build_model
    from tidar_megatron.training import distributed

    cfg = load_config("tiny", ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B), "--train.bf16", "true",
                               "--model.vocab_size", str(VOCAB)])
    distributed.initialize(cfg)
    core = build_model(cfg, on_gpu=True)[0].cuda().decoder.layers[0].self_attention.core_attention
    layout = TiDARLayout.for_training(L, B)
    hq, hkv, d = cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.head_dim
    q = torch.randn(2 * L, 2, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2 * L, 2, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2 * L, 2, hkv, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    got = core(q, k, v, layout.megatron_mask("cuda"))
    qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    rep = hq // hkv
    ref = F.scaled_dot_product_attention(qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                         attn_mask=layout.dense_mask("cuda")).permute(2, 0, 1, 3).flatten(2)
    return got.float().cpu(), ref.float().cpu()


def test_local_matches_sdpa_bf16():
    got, ref = run_on_ranks(1, _sdpa_core)[0]
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)


def test_backends_agree_bf16():
    backends = ["local", "flex", "kernel"]
    try:
        import transformer_engine.pytorch  # noqa: F401
        backends.append("te")
    except Exception:
        pass
    out = run_on_ranks(1, _backends_bf16, backends)[0]
    ref_loss, ref_grads = out["local"]
    for backend in backends[1:]:
        loss, grads = out[backend]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2, msg=f"{backend} loss")
        for name, g in grads.items():
            rel = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-12)
            assert rel <= 1e-2, f"{backend}: gradient of {name} differs (rel {rel:.2e})"
