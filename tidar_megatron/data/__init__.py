"""Data: tokenizer training, corpus tokenization to Megatron .bin/.idx, TiDAR datasets and loaders."""
