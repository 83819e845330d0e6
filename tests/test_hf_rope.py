"""RoPE read from config.json exactly as the installed transformers reads it, for every combination of
`rope_parameters`, `rope_scaling`, `rope_theta` and their 4.x spellings: the inverse frequencies and the
attention factor of tidar_megatron/hf/rope.py against transformers' own rotary embedding module built from
the same file (no Megatron: the conversions through megatron-core are in test_families.py)."""

import json

import pytest
import torch

from tidar_megatron.hf.config import UnsupportedHFCheckpoint, parse_hf_config
from tidar_megatron.hf.rope import inverse_frequencies, read_rope

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=131072)
LLAMA3 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
YARN_CARD = dict(type="yarn", factor=4.0, original_max_position_embeddings=32768)  # Qwen's model cards

CASES = {
    "nothing: theta 10000": dict(),
    "4.x rope_theta": dict(rope_theta=5e5, rope_scaling=None),
    "5 rope_parameters": dict(rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "both thetas: the block's wins": dict(rope_theta=5e5, rope_parameters=dict(rope_type="default", rope_theta=1e6)),
    "4.x llama3": dict(rope_theta=5e5, rope_scaling=dict(LLAMA3, rope_type="llama3")),
    "5 llama3": dict(rope_parameters=dict(LLAMA3, rope_type="llama3", rope_theta=5e5)),
    "llama3, original context not 8192": dict(rope_parameters=dict(LLAMA3, rope_type="llama3",
                                                                  original_max_position_embeddings=64)),
    "rope_scaling over rope_parameters (a card's YaRN on a 5 config)": dict(
        rope_parameters=dict(rope_type="default", rope_theta=1e6), rope_scaling=YARN_CARD),
    "the same with a top-level rope_theta": dict(
        rope_theta=1e6, rope_parameters=dict(rope_type="default", rope_theta=1e6), rope_scaling=YARN_CARD),
    "empty rope_scaling: rope_parameters": dict(rope_scaling={}, rope_parameters=dict(LLAMA3, rope_type="llama3")),
    "4.x linear": dict(rope_scaling=dict(type="linear", factor=2.0)),
    "type inside rope_parameters": dict(rope_parameters=dict(type="linear", factor=3.0)),
    "yarn, factor from the contexts": dict(rope_parameters=dict(rope_type="yarn", factor=None,
                                                                original_max_position_embeddings=32768)),
    "yarn with mscale, beta_fast 0 = 32, no truncation": dict(rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=4096, mscale=0.707, mscale_all_dim=1.0,
        beta_fast=0, truncate=False)),
    "yarn, mscale alone is ignored": dict(rope_parameters=dict(rope_type="yarn", factor=4.0,
                                                               original_max_position_embeddings=4096, mscale=2.0)),
    "yarn, a top-level original context wins": dict(original_max_position_embeddings=2048, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)),
    "yarn without original context: max_position_embeddings": dict(rope_scaling=dict(type="yarn", factor=2.0)),
}


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("case", list(CASES))
def test_rope_is_read_as_transformers_reads_it(case, model_type, tmp_path):
    raw = dict(BASE, model_type=model_type, **CASES[case])
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    module = {"llama": transformers.models.llama.modeling_llama.LlamaRotaryEmbedding,
              "qwen2": transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding}[model_type](config)
    theta, scaling, _ = read_rope(raw)
    inv_freq, attention_factor = inverse_frequencies(theta, 16, scaling)
    assert torch.equal(inv_freq, module.inv_freq) and attention_factor == module.attention_scaling


def test_the_case_the_issue_found_differs_from_reading_rope_parameters_first():
    """The mixed config really means YaRN at transformers' default theta, not plain RoPE at 1e6."""
    mixed = CASES["rope_scaling over rope_parameters (a card's YaRN on a 5 config)"]
    theta, scaling, block = read_rope(dict(BASE, **mixed))
    assert (theta, scaling["rope_type"], block) == (10000.0, "yarn", "rope_scaling")


@pytest.mark.parametrize("change, message", [
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope_scaling.type 'dynamic' is not supported: "
                                                          "megatron-core has no dynamic NTK scaling"),
    (dict(rope_parameters=dict(rope_type="longrope", short_factor=[1.0], long_factor=[1.0])),
     "rope_parameters.rope_type 'longrope' is not supported"),
    (dict(rope_parameters=dict(rope_type="yarn", factor=4.0, attention_factor=2.0)),
     "rope_parameters.attention_factor 2.0: megatron-core derives it"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
])
def test_what_neither_training_nor_the_decoder_runs_is_refused_naming_the_field(change, message):
    with pytest.raises(UnsupportedHFCheckpoint, match=message) as error:
        parse_hf_config(dict(BASE, model_type="llama", **change), set(), "x/config.json")
    assert str(error.value).startswith("x/config.json: ") and "\n" not in str(error.value)
