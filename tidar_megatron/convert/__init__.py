"""Hugging Face <-> TiDAR Megatron checkpoints (reading Hugging Face directories: `tidar_megatron.hf`).

    mapping.py     the HF <-> Megatron config and weight mapping, one table; the vocabulary decision
    hf_import.py   `tidar-megatron import-hf`
    hf_export.py   `tidar-megatron export`
    process.py     the fresh single-rank process a conversion runs in
"""

from tidar_megatron.convert.hf_export import export, export_local, resolve_checkpoint
from tidar_megatron.convert.hf_export import main as export_main
from tidar_megatron.convert.hf_import import import_hf, import_hf_local
from tidar_megatron.convert.hf_import import main as import_hf_main
from tidar_megatron.convert.mapping import ConvertError
from tidar_megatron.convert.process import single_rank_model

__all__ = ["ConvertError", "export", "export_local", "export_main", "import_hf", "import_hf_local",
           "import_hf_main", "resolve_checkpoint", "single_rank_model"]
