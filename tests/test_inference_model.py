"""The decoder's own model against transformers' (the independent reference): logits and greedy decoding."""

import json

import pytest
import torch

from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.layout import TiDARLayout
from tidar_megatron.testing import tiny_hf_checkpoint

transformers = pytest.importorskip("transformers")

FAMILIES = {
    # Qwen2: q/k/v biases that its config does not mention; tied embeddings.
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    # Qwen3: QK-norm, no bias, head_dim != hidden / heads.
    "qwen3": ("qwen3", dict(head_dim=32)),
    # Llama 3.1 RoPE scaling, with a short original context so all three frequency bands occur.
    "llama3": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=64))),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
    model_type, overrides = FAMILIES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    tiny_hf_checkpoint(path, model_type, initializer_range=0.1, **overrides)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, reference


def test_logits_match_transformers(checkpoint):
    path, reference = checkpoint
    model, _ = load_hf_model(path)
    tokens = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    layout = TiDARLayout.causal(tokens.shape[1])
    with torch.no_grad():
        expected = reference(tokens).logits
        got = model(tokens, layout.position_ids.expand(2, -1), layout.dense_mask()[None])
    assert ((got - expected).norm() / expected.norm()).item() <= 1e-5


def test_ar_greedy_matches_transformers_generate(checkpoint):
    path, reference = checkpoint
    decoder = Decoder.from_pretrained(path)
    prompt = [3, 14, 15, 92, 65]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                      do_sample=False)[0, len(prompt):].tolist()
    assert decoder.generate(prompt, 24, mode="ar").tokens == [expected]


def test_tidar_fields_and_eos_come_from_the_checkpoint(tmp_path):
    tiny_hf_checkpoint(tmp_path, "qwen2", eos_token_id=5, tidar_mask_token_id=127, tidar_draft_block_size=3)
    decoder = Decoder.from_pretrained(tmp_path)
    assert (decoder.mask_token_id, decoder.block_size, decoder.eos_token_ids) == (127, 3, (5,))
    assert Decoder.from_pretrained(tmp_path, block_size=6).block_size == 6


def test_unsupported_or_inconsistent_checkpoints_are_clear_errors(tmp_path):
    tiny_hf_checkpoint(tmp_path, "qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        load_hf_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(NotImplementedError, match="gpt2"):
        load_hf_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(tmp_path / "nowhere")
