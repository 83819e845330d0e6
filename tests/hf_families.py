"""Tiny random-weight Hugging Face checkpoints of every supported family, with their real config.json layouts
(the keys and spellings of the published checkpoints, including 4.x ones), their tokenizer and bf16 weights.

Sizes are tiny; everything else is the family's: RoPE block, tied or untied head, q/k/v biases, QK-norm,
head_dim, bos / eos ids, context length, a vocabulary with or without spare rows.  Built with transformers
from the config, offline.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLAMA3_ROPE = dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0, original_max_position_embeddings=8192,
                   rope_type="llama3")
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"

# name -> (config.json as published, tiny sizes; tokenizer size; generation_config.json or None)
FAMILIES = {
    # Llama 2: 4.x spelling, no rope_theta (10000), untied, the SentencePiece vocabulary has no spare slot.
    "llama2": (dict(architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2, hidden_act="silu",
                    initializer_range=0.02, max_position_embeddings=4096, model_type="llama", pretraining_tp=1,
                    rms_norm_eps=1e-5, rope_scaling=None, tie_word_embeddings=False, torch_dtype="bfloat16",
                    transformers_version="4.31.0", use_cache=True, vocab_size=VOCAB, **SMALL), VOCAB, None),
    # Llama 3.2 1B: tied, llama3 RoPE scaling (factor 32) in 4.x spelling, head_dim given.
    "llama3.2": (dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0,
                      bos_token_id=0, eos_token_id=1, head_dim=16, hidden_act="silu", initializer_range=0.02,
                      max_position_embeddings=131072, mlp_bias=False, model_type="llama", pretraining_tp=1,
                      rms_norm_eps=1e-5, rope_scaling=LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True,
                      torch_dtype="bfloat16", transformers_version="4.45.0", use_cache=True, vocab_size=VOCAB,
                      **SMALL), VOCAB, None),
    # Llama 3.1 8B Instruct: untied, llama3 scaling (factor 8) written by transformers 5, three eos ids,
    # sampling defaults in generation_config.json, a chat template.
    "llama3.1": (dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0,
                      bos_token_id=0, eos_token_id=[1, 2, 3], head_dim=16, hidden_act="silu",
                      initializer_range=0.02, max_position_embeddings=131072, mlp_bias=False, model_type="llama",
                      rms_norm_eps=1e-5, rope_parameters=dict(LLAMA3_ROPE, factor=8.0, rope_theta=500000.0),
                      tie_word_embeddings=False, dtype="bfloat16", transformers_version="5.0.0",
                      use_cache=True, vocab_size=VOCAB, **SMALL), VOCAB,
                 dict(bos_token_id=0, eos_token_id=[1, 2, 3], do_sample=True, temperature=0.6, top_p=0.9)),
    # Mistral 7B v0.3: no sliding window (null), rope_theta 1e6, untied.
    "mistral": (dict(architectures=["MistralForCausalLM"], attention_dropout=0.0, bos_token_id=1, eos_token_id=2,
                     hidden_act="silu", initializer_range=0.02, max_position_embeddings=32768, model_type="mistral",
                     rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False,
                     torch_dtype="bfloat16", transformers_version="4.42.0", use_cache=True, vocab_size=VOCAB,
                     **SMALL), VOCAB, None),
    # Qwen2.5 1.5B: tied, q/k/v biases (implied), a vocabulary with spare rows beyond the tokenizer.
    "qwen2.5": (dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=0, eos_token_id=0,
                     hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072,
                     max_window_layers=28, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
                     sliding_window=131072, tie_word_embeddings=True, torch_dtype="bfloat16",
                     transformers_version="4.40.1", use_cache=True, use_mrope=False, use_sliding_window=False,
                     vocab_size=VOCAB, **SMALL), 100, None),
    # Qwen2 7B Instruct with its model card's YaRN block added to a config written by transformers 5: both
    # rope_parameters and rope_scaling (transformers takes rope_scaling, and its rope_theta default).
    "qwen2-yarn": (dict(architectures=["Qwen2ForCausalLM"], attention_dropout=0.0, bos_token_id=0, eos_token_id=1,
                        hidden_act="silu", initializer_range=0.02, layer_types=["full_attention"] * 2,
                        max_position_embeddings=128, max_window_layers=28, model_type="qwen2", rms_norm_eps=1e-6,
                        rope_parameters=dict(rope_theta=1000000.0, rope_type="default"),
                        rope_scaling=dict(factor=4.0, original_max_position_embeddings=32, type="yarn"),
                        sliding_window=None, tie_word_embeddings=False, dtype="bfloat16",
                        transformers_version="5.0.0", use_cache=True, use_sliding_window=False, vocab_size=VOCAB,
                        **SMALL), 120, None),
    # Qwen3 8B: QK-norm, head_dim != hidden / heads, untied.
    "qwen3": (dict(architectures=["Qwen3ForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=0,
                   eos_token_id=1, head_dim=24, hidden_act="silu", initializer_range=0.02,
                   max_position_embeddings=40960, max_window_layers=36, model_type="qwen3", rms_norm_eps=1e-6,
                   rope_scaling=None, rope_theta=1000000, sliding_window=None, tie_word_embeddings=False,
                   torch_dtype="bfloat16", transformers_version="4.51.0", use_cache=True, use_sliding_window=False,
                   vocab_size=VOCAB, **SMALL), 110, None),
    # SmolLM 135M: Llama architecture, tied, bos = eos = 0, context 2048, no spare vocabulary slot.
    "smollm": (dict(architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0, bos_token_id=0,
                    eos_token_id=0, hidden_act="silu", initializer_range=0.02, intermediate_size=96,
                    max_position_embeddings=2048, model_type="llama", num_attention_heads=4, num_hidden_layers=2,
                    num_key_value_heads=2, hidden_size=64, pretraining_tp=1, rms_norm_eps=1e-5, rope_scaling=None,
                    rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="bfloat16",
                    transformers_version="4.40.1", use_cache=True, vocab_size=VOCAB), VOCAB, None),
}


def make_tokenizer(model_dir: Path, size: int, config: dict, chat_template: str | None = None):
    """A word-level tokenizer of exactly `size` tokens ("t<id>", the config's bos / eos as <s> / </s>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    special = {config["bos_token_id"]: "<s>", eos: "</s>"}
    vocab = {special.get(i, f"t{i}"): i for i in range(size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=f"t{size - 1}"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special[config["bos_token_id"]],
                                   eos_token=special[eos], unk_token=f"t{size - 1}")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(model_dir)


def make_checkpoint(model_dir: Path, name: str, seed: int = 0) -> Path:
    """`FAMILIES[name]` written to `model_dir`: config.json as published, bf16 safetensors weights (random,
    norms and biases away from 1 / 0 so that a swap shows), its tokenizer."""
    import transformers
    from safetensors.torch import save_file

    raw, tokenizer_size, generation = FAMILIES[name]
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(raw, indent=2))
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p)) if "norm" in param_name or "bias" in param_name else p.normal_(0, 0.1)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if raw.get("tie_word_embeddings"):
        state.pop("lm_head.weight")
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    if generation is not None:
        (model_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    make_tokenizer(model_dir, tokenizer_size, raw, CHAT_TEMPLATE if generation else None)
    return model_dir


def reference_logits(model_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits of a checkpoint directory, in fp32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits
