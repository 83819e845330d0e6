"""TiDAR decoding on exported Hugging Face checkpoints, without Megatron.

    decoder = Decoder.from_pretrained("path/to/hf_dir")          # tidar_* fields from config.json
    result = decoder.generate(prompt_ids, max_new_tokens=128)     # greedy TiDAR, lossless w.r.t. AR
    for step in decoder.stream(prompt_ids, 128, mode="ar", sampling=SamplingConfig(0.8, 0.95), seed=0): ...
"""

from tidar_megatron.inference.decoding import Decoder, DecodeStats, Generation, StreamStep
from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.inference.sampling import SamplingConfig

__all__ = ["Decoder", "DecodeStats", "Generation", "StreamStep", "SamplingConfig", "load_hf_model"]
