"""Custom GPU kernels for the TiDAR doubled sequence (installed as `tidar_kernels`)."""
