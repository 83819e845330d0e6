"""Everything that works around megatron-core (and torch, lm-eval) behaviour, in one place.

    megatron_rope.py    megatron-core 0.19's RoPE: YaRN settings, RoPE at the layout's positions (GPTModel._preprocess)
    cpu.py              megatron-core's real code paths on a machine without CUDA
    megatron_patches.py gaps of megatron-core 0.19's distributed optimizer and async checkpointing
    lm_eval_harness.py  lm-eval 0.4.13 names that lm-eval does not publish
    te_attention.py     TransformerEngine 2.17.1's record of the attention backend it chose
    triton_interpreter.py Triton 3.6's CPU interpreter under numpy >= 2.5 (the GPU node's stack)

Each workaround names the upstream version it was written against; remove it when that version is gone.
"""
