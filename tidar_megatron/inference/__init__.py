"""TiDAR decoding on exported Hugging Face checkpoints, without Megatron."""
