"""TiDAR pretraining on Megatron-core."""
