"""TiDARModel (Megatron-core's GPTModel with the TiDAR layout) and its attention backends."""

from tidar_megatron.model.tidar_model import TiDARModel, build_model, transformer_config

__all__ = ["TiDARModel", "build_model", "transformer_config"]
