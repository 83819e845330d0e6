"""TiDAR decoding with the Triton attention kernel (`Decoder(attention="kernel")`) against the SDPA path.

The kernel serves the passes where the whole batch shares one layout (prefill of equal prompts, every
decoding step at batch 1): prefix rows from the KV cache, then the pending block and the mask blocks as
queries (q_offset = the prefix).  Without a GPU it runs in Triton's interpreter, which must be switched on
before triton is imported, so the comparisons run in a fresh process.
"""

import pytest
import torch
from multirank import run_on_ranks

pytest.importorskip("transformers")  # only to write the tiny checkpoint

MASK_TOKEN_ID = 127
PROMPTS = [[7], [3, 14, 15, 92, 65], list(range(20, 37))]


def _compare(rank, world_size, model_dir):
    import tidar_kernels.tidar_attention as kernels

    from tidar_megatron.inference.decoding import Decoder
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.testing import tiny_hf_checkpoint

    calls = []
    real = kernels.tidar_attention
    kernels.tidar_attention = lambda q, k, v, layout, **kw: calls.append(layout) or real(q, k, v, layout, **kw)
    torch.set_num_threads(1)
    tiny_hf_checkpoint(model_dir, "qwen3", initializer_range=0.1, tidar_mask_token_id=MASK_TOKEN_ID)
    sdpa = Decoder.from_pretrained(model_dir, block_size=3)
    kernel = Decoder.from_pretrained(model_dir, block_size=3, attention="kernel")
    out = {"tokens": [], "passes": []}
    for prompt in PROMPTS:
        for mode in ("tidar", "ar"):
            a, b = sdpa.generate(prompt, 12, mode=mode), kernel.generate(prompt, 12, mode=mode)
            out["tokens"].append((a.tokens, b.tokens))
            out["passes"].append((a.stats.forward_passes, b.stats.forward_passes))
    out["kernel_calls"] = len(calls)
    # Batches: different prompts of one length share every layout in AR mode (kernel on every pass, at
    # batch 3), and the prefill in TiDAR mode; prompts of different lengths fall back to SDPA where the
    # sequences' layouts differ.
    equal = [PROMPTS[1], [9, 8, 7, 6, 5], [1, 2, 3, 4, 5]]
    out["batches"], out["batch_ar_calls"] = [], None
    for prompts, mode in ((equal, "ar"), (equal, "tidar"), (PROMPTS, "tidar"), (PROMPTS, "ar")):
        calls.clear()
        got = kernel.generate(prompts, 10, mode=mode)
        if prompts is equal and mode == "ar":
            out["batch_ar_calls"] = (len(calls), got.stats.forward_passes)
        out["batches"].append((sdpa.generate(prompts, 10, mode=mode).tokens, got.tokens))

    # One decoding pass, logits of both paths: prefix of 9 cached rows, then pending block + mask blocks.
    model = kernel.model
    layout = TiDARLayout.for_decoding(9, 3)
    tokens = torch.randint(0, 100, (1, layout.seq_len), generator=torch.Generator().manual_seed(0))
    tokens[0, 9 + 3:] = MASK_TOKEN_ID
    model.setup_kv_cache(1, layout.seq_len)
    positions = layout.position_ids[None]
    mask = layout.dense_mask()[None]
    with torch.inference_mode():
        model(tokens[:, :9], positions[:, :9], mask[:, :9, :9], torch.arange(9)[None], 9)  # fill the cache
        rows = torch.arange(9, layout.seq_len)[None]
        reference = model(tokens[:, 9:], positions[:, 9:], mask[:, 9:], rows, layout.seq_len)
        fused = model(tokens[:, 9:], positions[:, 9:], None, rows, layout.seq_len, layout=layout)
    out["logits"] = (reference, fused)
    return out


@pytest.mark.slow
def test_kernel_decoding_matches_sdpa_decoding(tmp_path):
    out = run_on_ranks(1, _compare, str(tmp_path / "model"), env={"TRITON_INTERPRET": "1"})[0]
    for (expected, got), (passes_sdpa, passes_kernel) in zip(out["tokens"], out["passes"]):
        assert got == expected and passes_kernel == passes_sdpa
    # Batch 1: every pass (prefill included) of every generation ran the kernel, in each of the 2 layers.
    assert out["kernel_calls"] == 2 * sum(passes for _, passes in out["passes"])
    for expected, got in out["batches"]:
        assert got == expected
    calls, passes = out["batch_ar_calls"]
    assert calls == 2 * passes
    reference, fused = out["logits"]
    assert ((fused - reference).abs().max() / reference.abs().max()).item() <= 1e-4


def test_kernel_attention_problems_are_reported_before_decoding():
    from tidar_megatron.inference.decoding import Decoder
    from tidar_megatron.inference.model import ModelArgs, Transformer

    def model(head_dim):
        return Transformer(ModelArgs(vocab_size=32, hidden_size=head_dim * 2, intermediate_size=16, num_layers=1,
                                     num_heads=2, num_kv_heads=1, head_dim=head_dim, rms_norm_eps=1e-6,
                                     rope_theta=1e4))

    with pytest.raises(ValueError, match="does not run under compile"):
        Decoder(model(16), attention="kernel", compile=True)
    with pytest.raises(ValueError, match="head_dim that is a power of two"):
        Decoder(model(24), attention="kernel")
    with pytest.raises(ValueError, match="attention must be one of"):
        Decoder(model(16), attention="flash")
    from tidar_kernels.tidar_attention_triton import interpreter_active

    if not interpreter_active():  # this process: a CPU model without Triton's interpreter
        with pytest.raises(ValueError, match="needs Triton's interpreter"):
            Decoder(model(16), attention="kernel")
