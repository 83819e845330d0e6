"""TiDAR pretraining on Megatron-core."""

from tidar_megatron.compat.triton_interpreter import patch_scalar_index

patch_scalar_index()  # only under TRITON_INTERPRET=1: the CPU path of the kernels on Triton 3.6
