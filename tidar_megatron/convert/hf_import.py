"""`tidar-megatron import-hf`: a Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory -> a TiDAR checkpoint.

    tidar-megatron import-hf --hf <dir> --output <ckpt> [--config PRESET] [--tp N --pp N] [--mask-token-id ID]

Writes `<output>/iter_0000000` (loads at any TP/PP: dist_checkpointing reshards by global shape) and
`<output>/config.yaml`, the config to train it with: the architecture, RoPE and vocabulary from the
checkpoint, the rest from the preset, `data.tokenizer` the directory's tokenizer and `checkpoint.init_from`
the checkpoint.  The default preset is the paper's continual-pretraining recipe for the model's size (`1p5b`,
or `8b` above 4B parameters): peak lr 1e-5, cosine to 3e-6, 1% warm-up, 2M-token batches, document-level
attention; the draft block size is the checkpoint's own where it has one (a TiDAR export), and the sequence
length at most the checkpoint's context.

The vocabulary is decided here, once (`mapping.choose_mask_token`), with the tokenizer the training run will
use: the checkpoint, config.yaml and the tokenizer agree, and a log line says which row the mask token is and
how it starts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import yaml

from tidar_megatron.atomic import atomic_dir
from tidar_megatron.config import load_config
from tidar_megatron.console import entry_point
from tidar_megatron.convert.mapping import (
    ConvertError,
    choose_mask_token,
    config_from_hf,
    hf_to_megatron,
    start_mask_row_as_mean,
)
from tidar_megatron.convert.process import in_fresh_process, single_rank_model
from tidar_megatron.data.tokenizer import Tokenizer, TokenizerError
from tidar_megatron.hf.config import HFConfigError, read_hf_config
from tidar_megatron.hf.weights import load_weights

# megatron-core (seconds to import) and the training modules are imported inside the functions that run in
# the spawned conversion process (process.py): `import-hf --help` and the calling process stay light.

log = logging.getLogger(__name__)
# Files that make a directory a Hugging Face tokenizer (AutoTokenizer reads one of them).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def check_output(output: Path, force: bool):
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ConvertError(f"{output} already exists; pass --force to replace it or choose another --output")


def recipe_preset(hf) -> str:
    """The continual-pretraining preset for a checkpoint's size: 8b above 4B parameters, else 1p5b."""
    attention = hf.hidden_size * hf.head_dim * (2 * hf.num_heads + 2 * hf.num_kv_heads)
    layers = hf.num_layers * (attention + 3 * hf.hidden_size * hf.intermediate_size)
    embeddings = hf.vocab_size * hf.hidden_size * (1 if hf.tie_word_embeddings else 2)
    return "8b" if layers + embeddings > 4e9 else "1p5b"


def read_hf(hf_dir: Path):
    """(HFConfig, weights) of a Hugging Face directory, read as the decoder reads it."""
    try:
        weights = load_weights(hf_dir) if hf_dir.is_dir() else {}
        return read_hf_config(hf_dir, weights), weights
    except HFConfigError as e:
        raise ConvertError(str(e)) from None


def read_tokenizer(hf_dir: Path) -> Tokenizer | None:
    """The directory's tokenizer as training will load it (`--data.tokenizer <dir>`), if it has one."""
    if not any((hf_dir / name).is_file() for name in TOKENIZER_MARKERS):
        return None
    try:
        return Tokenizer(str(hf_dir))
    except TokenizerError as e:
        raise ConvertError(str(e)) from None


def import_hf_local(hf_dir, output, tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
                    mask_token_id: int | None = None, force: bool = False, preset: str | None = None) -> Path:
    """Convert in this process; needs a single-rank Megatron session (`process.session`)."""
    from megatron.core import dist_checkpointing

    from tidar_megatron.training.distributed import validate_layout

    hf_dir, output = Path(hf_dir), Path(output)
    check_output(output, force)
    hf, weights = read_hf(hf_dir)
    tokenizer = read_tokenizer(hf_dir)
    preset = recipe_preset(hf) if preset == "auto" else preset
    source = str(hf_dir / "config.json")
    mask = choose_mask_token(hf, mask_token_id, tokenizer and (tokenizer.text_vocab_size, tokenizer.mask_id), source)
    cfg = config_from_hf(hf, set(weights), tensor_parallel, pipeline_parallel, mask,
                         base=load_config(preset) if preset else None, source=source)
    if tokenizer is not None:
        cfg.data.tokenizer = str(hf_dir.resolve())
    validate_layout(cfg, cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    full = hf_to_megatron(cfg, weights, source=str(hf_dir))
    if mask.fresh_row and mask.mask_token_id < hf.vocab_size:
        start_mask_row_as_mean(cfg, full, hf.vocab_size)
    model = single_rank_model(cfg)
    params = dict(model.named_parameters())
    if set(full) != set(params):
        raise ConvertError(f"{hf_dir}: the mapping gives {sorted(set(full) ^ set(params))[:3]} that the "
                           "model does not have (or lacks): a bug in convert/mapping.TABLE")
    with torch.no_grad():
        for name, p in params.items():
            if full[name].shape != p.shape:
                raise ConvertError(f"{hf_dir}: {name} would have shape {tuple(full[name].shape)} but "
                                   f"config.json gives {tuple(p.shape)}: the weights do not match config.json")
            p.copy_(full[name])
    check_output(output, force)
    with atomic_dir(output) as tmp:
        (tmp / "iter_0000000").mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "config": cfg.to_dict(), "step": 0,
                                 "source": str(hf_dir.resolve())}, str(tmp / "iter_0000000"))
        (tmp / "latest").write_text("iter_0000000\n")
        # A config to train from: `tidar-megatron train --config <ckpt>/config.yaml --data.blend ...`.
        cfg.checkpoint.init_from = str(output.resolve())
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    rope = (cfg.model.rope_scaling or {}).get("rope_type", "plain")
    log.info("%s: %s, %s RoPE (theta %g), vocabulary %d rows + padding to %d; %s", output, hf.model_type, rope,
             cfg.model.rope_base, cfg.model.vocab_size, cfg.padded_vocab_size, mask.story)
    log.info("%s/config.yaml: preset %s, draft blocks of %d, sequences of %d, tokenizer %s", output,
             preset or "defaults", cfg.tidar.draft_block_size, cfg.train.seq_length,
             cfg.data.tokenizer or "not in the directory (give --data.tokenizer)")
    return output


def import_hf(hf_dir, output, tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
              mask_token_id: int | None = None, force: bool = False, preset: str | None = "auto") -> Path:
    """A Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory -> a TiDAR checkpoint (`<output>/iter_0000000`)
    and the config to train it with (`<output>/config.yaml`: the architecture from config.json, the rest from
    the preset; "auto": the paper's recipe for its size, None: the built-in defaults)."""
    check_output(Path(output), force)
    if preset and preset != "auto":
        load_config(preset)  # a bad preset name fails here, before a process starts
    read_hf(Path(hf_dir))  # and so does a directory that is not a checkpoint
    return in_fresh_process(import_hf_local, str(hf_dir), str(output), tensor_parallel, pipeline_parallel,
                            mask_token_id, force, preset)


@entry_point("tidar-megatron import-hf")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron import-hf", description=import_hf.__doc__)
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--config", default="auto", help="preset or YAML to take the training settings from "
                        "(default auto: the paper's continual-pretraining recipe, 1p5b or 8b by the model's size); "
                        "the architecture always comes from the Hugging Face config.json")
    parser.add_argument("--tp", type=int, help="the TP to write into config.yaml and check the architecture "
                        "against (default: the preset's); the checkpoint itself loads at any layout")
    parser.add_argument("--pp", type=int, help="the PP for config.yaml (default: the preset's)")
    parser.add_argument("--mask-token-id", type=int, help="an existing token to use as the mask token "
                        "(default: the checkpoint's tidar_mask_token_id, else the tokenizer's <|mask|> or first "
                        "free id, else a new id = vocab_size)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    a = parser.parse_args(argv)
    print(import_hf(a.hf, a.output, a.tp, a.pp, a.mask_token_id, a.force, a.config))
    return 0
