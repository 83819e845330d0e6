"""The TiDAR model on one CPU rank (a spawned process, so Megatron's global state stays out of pytest):
attention backends against torch SDPA, the no-leak invariant, the loss against a hand-computed
cross-entropy, and a few optimizer steps lowering both losses."""

import pytest
import torch
import torch.nn.functional as F
from multirank import run_on_ranks

L, B, VOCAB = 12, 4, 64


def _cfg(*extra):
    from tidar_megatron.config import load_config

    return load_config("tiny", ["--train.seq_length", str(L), "--tidar.draft_block_size", str(B),
                                "--model.vocab_size", str(VOCAB), *extra])


def _sdpa_reference(q, k, v, keep, scale):
    """q [s, b, hq, d], k/v [s, b, hkv, d] -> [s, b, hq*d] with torch SDPA (True = keep)."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)
    return out.permute(2, 0, 1, 3).flatten(2)


def _suite(rank, world_size):
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.model import build_model
    from tidar_megatron.model.attention import FlexTiDARAttention
    from tidar_megatron.training import distributed
    from tidar_megatron.training.forward_step import make_forward_step
    from tidar_megatron.training.loss import TokenCounts
    from tidar_megatron.training.trainer import build_trainer

    cfg = _cfg("--tidar.alpha", "0.5")
    distributed.initialize(cfg)
    model = build_model(cfg, on_gpu=False)[0]
    layout = TiDARLayout.for_training(L, B)
    out = {}

    # 1. Core attention: Megatron's local DotProductAttention (arbitrary mask) and flex vs SDPA.
    core = model.decoder.layers[0].self_attention.core_attention
    g = torch.Generator().manual_seed(1)
    hq, hkv, d = cfg.model.num_attention_heads, cfg.model.num_query_groups, cfg.model.head_dim
    q = torch.randn(2 * L, 2, hq, d, generator=g, requires_grad=True)
    k = torch.randn(2 * L, 2, hkv, d, generator=g, requires_grad=True)
    v = torch.randn(2 * L, 2, hkv, d, generator=g, requires_grad=True)
    grad_out = torch.randn(2 * L, 2, hq * d, generator=g)
    local = core(q, k, v, layout.megatron_mask())
    local_grads = torch.autograd.grad(local, (q, k, v), grad_out)
    ref = _sdpa_reference(q, k, v, layout.dense_mask(), d ** -0.5)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    out["local_vs_sdpa"] = [(local.detach(), ref.detach())] + list(zip(local_grads, ref_grads))
    flex = FlexTiDARAttention(model.config, 1, None, None)
    with torch.no_grad():
        out["flex_vs_sdpa"] = (flex(q.detach(), k.detach(), v.detach(), layout.to_tensor()), ref.detach())

    # 2. No leak: changing clean token t changes no logit that is trained to predict it.
    model.eval()
    windows = torch.randint(0, VOCAB, (2, L + 1), generator=g)
    batch = from_token_windows(layout, windows, cfg.tidar.mask_token_id)
    leaks, changed = [], 0
    with torch.no_grad():
        base = model(batch["input_ids"], batch["position_ids"])
        for t in range(L):
            ids = batch["input_ids"].clone()
            ids[:, t] = (ids[:, t] + 1) % VOCAB
            new = model(ids, batch["position_ids"])
            predictors = [L + t] + ([t - 1] if t > 0 else [])  # diffusion slot at position t, AR slot t-1
            leaks += [(t, i) for i in predictors if not torch.equal(new[:, i], base[:, i])]
            changed += int(not torch.equal(new[:, t], base[:, t]))  # the perturbed token's own AR slot
        # 3. Flex model forward equals local model forward.
        flex_model = build_model(_cfg("--model.attention_backend", "flex"), on_gpu=False)[0]
        flex_model.load_state_dict(model.state_dict())
        flex_model.eval()
        out["flex_model_vs_local"] = (flex_model(batch["input_ids"], batch["position_ids"]), base)
    out["leaks"], out["changed"] = leaks, changed

    # 4. Loss against a hand-computed cross-entropy over the layout's targets (with some targets masked).
    batch["ar_mask"][0, 3] = 0
    batch["diff_mask"][1, L + 5] = 0
    counts = TokenCounts.of([batch])
    step = make_forward_step(layout, cfg.tidar.alpha, counts, num_microbatches=1, dp_size=1)
    with torch.no_grad():
        output, loss_func = step(iter([batch]), model)
        share, stats = loss_func(output)
    out["loss"] = (share, base, batch)

    # 5. A few optimizer steps on a learnable task lower both losses.
    model.train()
    trainer = build_trainer(_cfg("--train.lr", "1e-2", "--train.lr_warmup_steps", "0",
                                 "--train.lr_decay_style", "constant", "--train.min_lr", "0"), on_gpu=False)
    period = torch.arange(8) * 7 % VOCAB
    history = []
    for step_i in range(25):
        starts = torch.randint(0, 8, (cfg.train.global_batch_size,), generator=g)
        windows = torch.stack([period[(s + torch.arange(L + 1)) % 8] for s in starts])
        mbs = cfg.train.micro_batch_size
        micro = [from_token_windows(layout, windows[i:i + mbs], cfg.tidar.mask_token_id)
                 for i in range(0, len(windows), mbs)]
        history.append(trainer.train_step(micro))
    out["history"] = history
    return out


@pytest.fixture(scope="module")
def suite():
    return run_on_ranks(1, _suite)[0]


def test_local_backend_matches_sdpa_forward_and_gradients(suite):
    for got, ref in suite["local_vs_sdpa"]:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_flex_backend_matches_sdpa_and_local(suite):
    got, ref = suite["flex_vs_sdpa"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    got, ref = suite["flex_model_vs_local"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_no_position_sees_the_token_it_predicts(suite):
    assert suite["leaks"] == []
    assert suite["changed"] == L  # the perturbation itself is visible where it should be


def test_loss_equals_hand_computed_cross_entropy(suite):
    share, logits, batch = suite["loss"]
    alpha = 0.5
    ce = F.cross_entropy(logits.flatten(0, 1).double(), batch["targets"].flatten(), reduction="none")
    ce = ce.view_as(batch["targets"])
    ar = (ce * batch["ar_mask"]).sum() / batch["ar_mask"].sum()
    diff = (ce * batch["diff_mask"]).sum() / batch["diff_mask"].sum()
    # AR targets: the next clean token; diffusion targets: the clean token at the mask's position.
    assert torch.equal(batch["targets"][:, :L - 1], batch["input_ids"][:, 1:L])
    assert torch.equal(batch["targets"][:, L:], batch["input_ids"][:, :L])
    torch.testing.assert_close(share.double(), (alpha * ar + diff) / (1 + alpha), rtol=1e-5, atol=0)


def test_optimizer_steps_lower_both_losses(suite):
    h = suite["history"]
    first = {k: sum(m[k] for m in h[:3]) / 3 for k in ("loss_ar", "loss_diff")}
    last = {k: sum(m[k] for m in h[-3:]) / 3 for k in ("loss_ar", "loss_diff")}
    assert last["loss_ar"] < 0.5 * first["loss_ar"], (first, last)
    assert last["loss_diff"] < 0.8 * first["loss_diff"], (first, last)


class _SdpaCoreAttention(torch.nn.Module):
    """A reference core attention: torch SDPA with a dense mask fixed at construction (True = keep)."""

    def __init__(self, keep, scale):
        super().__init__()
        self.keep, self.scale = (keep[:, None] if keep.dim() == 3 else keep), scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        return _sdpa_reference(query, key, value, self.keep, self.scale)


def _layouts_suite(rank, world_size):
    """Every CPU backend run with non-default layouts (causal, a decoding pass, training): the output and
    the gradient of the inputs' embeddings against the same weights with SDPA and the layout's dense mask,
    and the layout each backend's core attention was handed."""
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.model import build_model
    from tidar_megatron.training import distributed

    distributed.initialize(_cfg())
    layouts = {"causal": TiDARLayout.causal(2 * L), "decoding": TiDARLayout.for_decoding(9, B),
               "training": TiDARLayout.for_training(L, B),
               # packed documents: per-sample masks and positions (a cut inside a block, a 1-token document)
               "documents": TiDARLayout.for_training(L, B).with_documents([(5, 6), (9,)])}
    models = {}
    for backend in ("local", "flex", "kernel"):
        models[backend] = build_model(_cfg("--model.attention_backend", backend), on_gpu=False)[0]
        models[backend].load_state_dict(models["local"].state_dict())
    g = torch.Generator().manual_seed(3)
    out = {}
    for name, layout in layouts.items():
        ids = torch.randint(0, VOCAB, (2, layout.seq_len), generator=g)
        positions = layout.position_ids
        reference = build_model(_cfg(), on_gpu=False)[0]
        reference.load_state_dict(models["local"].state_dict())
        for layer in reference.decoder.layers:
            core = layer.self_attention.core_attention
            layer.self_attention.core_attention = _SdpaCoreAttention(layout.dense_mask(), core.softmax_scale)
        expected = reference(ids, positions, attention_mask=torch.zeros(1, dtype=torch.bool), layout=layout)
        expected.sum().backward()
        expected_grad = reference.embedding.word_embeddings.weight.grad.clone()
        for backend, model in models.items():
            seen = []
            core = model.decoder.layers[0].self_attention.core_attention
            hook = core.register_forward_pre_hook(lambda m, args: seen.append(args[3]))
            model.zero_grad()
            if backend == "flex":  # FlexAttention has no backward on the CPU
                with torch.no_grad():
                    got, grad = model(ids, positions, layout=layout), None
            else:
                got = model(ids, positions, layout=layout)
                got.sum().backward()
                grad = model.embedding.word_embeddings.weight.grad.clone()
            hook.remove()
            applied = seen[0] if backend == "local" else TiDARLayout.from_tensor(seen[0]).dense_mask()
            out[name, backend] = (got.detach(), expected.detach(), grad, expected_grad, applied, layout.dense_mask())
    return out


@pytest.mark.slow
def test_every_backend_applies_the_layout_it_is_given():
    """The structure issue's rule: the layout reaches attention through the model's forward, on every
    backend, so a causal or decoding layout is never replaced by the training mask."""
    results = run_on_ranks(1, _layouts_suite)[0]
    for (name, backend), (got, expected, grad, expected_grad, applied, keep) in results.items():
        where = f"{backend} backend, {name} layout"
        if backend == "local":  # Megatron polarity: True = masked
            assert torch.equal(applied, ~(keep[:, None] if keep.dim() == 3 else keep[None, None])), where
        else:
            assert torch.equal(applied, keep), where
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=where)
        if grad is not None:  # relative to the largest entry: the sum's gradient reaches ~1e2
            assert (grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max(), where


def _documents_suite(rank, world_size):
    """Packed documents on the local backend: no token of one document changes a logit of another, and the
    per-token losses of two packed documents equal those of each document in its own window."""
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.model import build_model
    from tidar_megatron.training import distributed

    cfg = _cfg()
    distributed.initialize(cfg)
    model = build_model(cfg, on_gpu=False)[0].eval()
    cut = 5  # document A = clean indices [0, 5) (cut inside block [4, 8)), B = [5, 12)
    packed = TiDARLayout.for_training(L, B).with_documents([(cut,)])
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (1, L), generator=g)
    doc_of_row = (packed.source_index >= cut).long()  # 0: A, 1: B, for every row of the doubled sequence
    with torch.no_grad():
        ids = packed.training_inputs(tokens, cfg.tidar.mask_token_id)
        base = model(ids, packed.position_ids, layout=packed)
        leaks = []
        for t in range(L):
            changed = ids.clone()
            changed[0, t] = (changed[0, t] + 1) % VOCAB
            new = model(changed, packed.position_ids, layout=packed)
            other = doc_of_row != int(t >= cut)
            leaks += [(t, r) for r in other.nonzero().flatten().tolist() if not torch.equal(new[0, r], base[0, r])]
        # Each document alone, in a window whose blocks are the packed blocks' parts inside it.
        alone = {"A": TiDARLayout(cut, B, (0, 4), (4, cut)), "B": TiDARLayout(L - cut, B, (0, 3), (3, L - cut))}
        logits = {"A": model(alone["A"].training_inputs(tokens[:, :cut], cfg.tidar.mask_token_id),
                             alone["A"].position_ids, layout=alone["A"]),
                  "B": model(alone["B"].training_inputs(tokens[:, cut:], cfg.tidar.mask_token_id),
                             alone["B"].position_ids, layout=alone["B"])}
        try:  # a layout for one sample must not be broadcast over two
            model(ids.expand(2, -1), packed.position_ids.expand(2, -1), layout=packed)
            mismatch = None
        except ValueError as e:
            mismatch = str(e)
    return {"leaks": leaks, "packed": base, "alone": logits, "mismatch": mismatch}


@pytest.mark.slow
def test_packed_documents_are_independent():
    out = run_on_ranks(1, _documents_suite)[0]
    assert out["leaks"] == []
    assert out["mismatch"] == "the layout describes 1 samples but the batch has 2"
    packed, alone, cut = out["packed"][0], out["alone"], 5
    # Rows in order: clean A, clean B, then the mask rows, which follow the clean indices they draft.
    torch.testing.assert_close(packed[:cut], alone["A"][0, :cut], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[cut:L], alone["B"][0, :L - cut], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[L:L + cut], alone["A"][0, cut:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[L + cut:], alone["B"][0, L - cut:], rtol=1e-5, atol=1e-5)


def test_rope_at_positions_gathers_megatron_cores_table_and_names_its_version():
    """compat/megatron_rope.py's override of GPTModel's private _preprocess: RoPE rows at the layout's
    positions ([S] or per sample [b, S]); another megatron-core, or a path with cos / sin tables, is refused."""
    from tidar_megatron.compat.megatron_rope import RopeAtPositions, check_megatron_core_version
    from tidar_megatron.errors import TiDARError

    check_megatron_core_version((0, 19))
    with pytest.raises(TiDARError, match=r"^tidar_megatron/compat/megatron_rope.py overrides GPTModel._preprocess "
                                         r"of megatron-core 0.19, but 0.20 is installed"):
        check_megatron_core_version((0, 20))

    def table(n):  # row i holds i: [n, 1, 1, 2], megatron-core's rotary_pos_emb layout
        return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 1, 2)

    class Preprocess:  # stands in for GPTModel: returns what its _preprocess returns for 0..S-1
        def __init__(self, outputs):
            self.outputs = outputs

        def _preprocess(self, input_ids, position_ids, **kwargs):
            return self.outputs

    class Model(RopeAtPositions, Preprocess):
        rotary_pos_emb = staticmethod(table)

    positions = torch.tensor([0, 1, 2, 1, 2, 3])
    out = Model(("hidden", table(6), None, None, None, None))._preprocess(None, positions)
    assert out[0] == "hidden" and out[1].shape == (6, 1, 1, 2) and out[1][:, 0, 0, 0].tolist() == positions.tolist()
    per_sample = torch.stack([positions, positions + 1])
    out = Model(("hidden", table(6), None, None, None, None))._preprocess(None, per_sample)
    assert out[1].shape == (6, 2, 1, 2) and torch.equal(out[1][:, :, 0, 0].T, per_sample.float())
    with pytest.raises(TiDARError, match="flash_decode"):
        Model(("hidden", None, table(6), table(6), None, None))._preprocess(None, positions)


def test_te_backend_record_names_its_compat_module_without_te():
    import importlib.util

    from tidar_megatron.compat.te_attention import selected_attention_backends
    from tidar_megatron.errors import TiDARError

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("TransformerEngine is installed: tests/test_gpu.py runs the te backend")
    with pytest.raises(TiDARError, match=r"compat/te_attention.py reads TransformerEngine 2.17.1"):
        selected_attention_backends()
