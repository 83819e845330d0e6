"""Reading Hugging Face checkpoint directories: the one place that decides what a config.json and its weights
mean, shared by conversion (`convert/`), the decoder (`inference/`) and, through them, training and serving.

    config.py    config.json (with generation_config.json and the chat template) -> HFConfig
    rope.py      RoPE as transformers reads it: theta, scaling, inverse frequencies, config.json fields
    weights.py   safetensors weights, single file or sharded

No Megatron and no transformers: the decoder uses it without the training stack, and transformers stays the
independent reference in the tests.
"""
