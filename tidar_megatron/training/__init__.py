"""Pretraining on Megatron-core: the loop, the trainer, the forward step and loss, checkpoints,
process groups and metrics.  `tidar-megatron train` runs `loop.main`."""
