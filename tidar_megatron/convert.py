"""`tidar-megatron import-hf` and `tidar-megatron export`: Hugging Face <-> TiDAR Megatron checkpoints.

    tidar-megatron import-hf --hf <dir> --output <ckpt> [--config PRESET] [--tp N --pp N] [--mask-token-id ID]
    tidar-megatron export --checkpoint <ckpt> --output <dir> [--tokenizer PATH] [--force]

Both run Megatron in one CPU process at TP=1/PP=1.  That is enough for every layout: dist_checkpointing
stores tensors by global shape (stacked layers, SwiGLU's [gate; up] and the vocab-parallel rows included),
and the padded vocabulary does not depend on TP (`Config.padded_vocab_size`), so a checkpoint written here
loads at any TP/PP and one of any TP/PP loads here.  `--tp/--pp` on import only go into the saved config and
are checked against the architecture.

The public functions run in a fresh spawned process (convert_process.py); `import_hf_local` / `export_local`
do the work in the current process and need a single-rank Megatron session there.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from .config import Config, ConfigError, from_dict, load_config
from .convert_mapping import ConvertError, architecture, config_from_hf, hf_config, hf_to_megatron, megatron_to_hf
from .convert_process import in_fresh_process

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


# --- output directories ---------------------------------------------------------------------------
def _check_output(output: Path, force: bool):
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not force:
        raise ConvertError(f"{output} already exists; pass --force to replace it or choose another --output")


@contextlib.contextmanager
def _atomic_dir(output: Path, force: bool):
    """Yield a temporary directory beside `output` that becomes `output` only when the block succeeds."""
    _check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".tmp.{output.name}.*"):  # left by a killed conversion
        shutil.rmtree(stale, ignore_errors=True)
    tmp = output.parent / f".tmp.{output.name}.{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        old = output.parent / f".old.{output.name}.{os.getpid()}"
        if output.exists():  # --force: set the old one aside until the new one is in place
            os.replace(output, old)
        try:
            os.replace(tmp, output)
        except OSError:
            if old.exists():
                os.replace(old, output)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- a single-rank Megatron model ------------------------------------------------------------------
def _single_rank(cfg: Config) -> Config:
    """`cfg` at TP=1/PP=1 on the CPU (the weights' shapes do not depend on the layout)."""
    single = from_dict(cfg.to_dict())
    single.model.attention_backend = "local"  # weights do not depend on the backend
    single.parallel = dataclasses.replace(single.parallel, tensor_parallel=1, pipeline_parallel=1,
                                          virtual_pipeline=None, sequence_parallel=False)
    single.train.device, single.train.bf16 = "cpu", False
    return single


def _build(cfg: Config):
    from .model import build_model

    return build_model(_single_rank(cfg), on_gpu=False)[0]


# --- import ---------------------------------------------------------------------------------------
def _read_hf(hf_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and safetensors weights, read as the decoder reads them (inference.hf_checkpoint)."""
    from .inference.hf_checkpoint import load_weights, read_config

    try:
        return read_config(hf_dir), load_weights(hf_dir)
    except FileNotFoundError as e:
        raise ConvertError(f"{e}; only safetensors checkpoints are read") from None


def import_hf_local(hf_dir, output, tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
                    mask_token_id: int | None = None, force: bool = False, preset: str | None = None) -> Path:
    """Convert in this process; needs a single-rank Megatron session (`convert_process.session`)."""
    from megatron.core import dist_checkpointing

    from .distributed import validate_layout

    hf_dir, output = Path(hf_dir), Path(output)
    _check_output(output, force)
    hf, weights = _read_hf(hf_dir)
    cfg = config_from_hf(hf, set(weights), tensor_parallel, pipeline_parallel, mask_token_id,
                         base=load_config(preset) if preset else None, source=str(hf_dir / "config.json"))
    validate_layout(cfg, cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel)
    full = hf_to_megatron(cfg, weights, source=str(hf_dir))
    model = _build(cfg)
    params = dict(model.named_parameters())
    if set(full) != set(params):
        raise ConvertError(f"{hf_dir}: the mapping gives {sorted(set(full) ^ set(params))[:3]} that the "
                           "model does not have (or lacks): a bug in convert_mapping.TABLE")
    with torch.no_grad():
        for name, p in params.items():
            if full[name].shape != p.shape:
                raise ConvertError(f"{hf_dir}: {name} would have shape {tuple(full[name].shape)} but "
                                   f"config.json gives {tuple(p.shape)}: the weights do not match config.json")
            p.copy_(full[name])
    with _atomic_dir(output, force) as tmp:
        (tmp / "iter_0000000").mkdir()
        dist_checkpointing.save({"model": model.sharded_state_dict(), "config": cfg.to_dict(), "step": 0,
                                 "source": str(hf_dir.resolve())}, str(tmp / "iter_0000000"))
        (tmp / "latest").write_text("iter_0000000\n")
        # A config to train from: `tidar-megatron train --config <ckpt>/config.yaml --data.blend ...`.
        cfg.checkpoint.init_from = str(output.resolve())
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return output


# --- export ---------------------------------------------------------------------------------------
def _resolve_checkpoint(path: Path) -> Path:
    from .checkpoint import find_resumable

    if (path / "metadata.json").is_file():
        return path
    found = find_resumable(path)
    if not found:
        raise ConvertError(f"{path}: no checkpoint (expected metadata.json or iter_* folders with a `latest`)")
    return found[0]


def _check_shapes(path: Path, model):
    """Every tensor's saved global shape against the one the saved config builds; one line on a mismatch."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for sh in nested_values(model.sharded_state_dict()):
        if not isinstance(sh, ShardedTensor):  # SwiGLU's fc1 factory: checked by the load itself
            continue
        if sh.key not in saved:
            raise ConvertError(f"{path}: has no tensor {sh.key}, which its config implies; the config does not "
                               "match the weights")
        if tuple(saved[sh.key].global_shape) != tuple(sh.global_shape):
            raise ConvertError(f"{path}: {sh.key} has shape {tuple(saved[sh.key].global_shape)} but the saved "
                               f"config gives {tuple(sh.global_shape)}; the config does not match the weights")


def _check_tokenizer(tokenizer) -> Path | None:
    if tokenizer and not Path(tokenizer).exists():
        raise ConvertError(f"tokenizer {tokenizer}: not found; pass a tokenizer.model file or a tokenizer directory")
    return Path(tokenizer) if tokenizer else None


def _eos_id(tokenizer: Path | None) -> int | None:
    """The tokenizer's end-of-document id: generation_config.json's eos_token_id, where decoding stops."""
    if tokenizer is None:
        return None
    from .data.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer(str(tokenizer)).eod_id
    except TokenizerError as e:
        raise ConvertError(str(e)) from None


def export_local(checkpoint_dir, output_dir, tokenizer=None, force: bool = False) -> Path:
    """Export in this process; needs a single-rank Megatron session (`convert_process.session`)."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from .checkpoint import CheckpointError, load_model_weights

    output = Path(output_dir)
    _check_output(output, force)
    tokenizer = _check_tokenizer(tokenizer)
    path = _resolve_checkpoint(Path(checkpoint_dir))
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "config" not in common:
        raise ConvertError(f"{path}: has no saved config; is it a tidar_megatron checkpoint?")
    try:
        cfg = from_dict(common["config"], source=f"{path} (saved config)")
        architecture(cfg)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    model = _build(cfg)
    _check_shapes(path, model)
    try:
        load_model_weights([model], path)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    params = {n: p.detach() for n, p in model.named_parameters()}
    dtype = params["decoder.final_layernorm.weight"].dtype
    eos = _eos_id(tokenizer)
    with _atomic_dir(output, force) as tmp:
        save_file(megatron_to_hf(cfg, params), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config(cfg, dtype, eos_token_id=eos), indent=2) + "\n")
        generation = {} if eos is None else {"eos_token_id": eos}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None and tokenizer.is_file():
            shutil.copy(tokenizer, tmp / "tokenizer.model")
        elif tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copy(tokenizer / name, tmp / name)
    return output


def import_hf(hf_dir, output, tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
              mask_token_id: int | None = None, force: bool = False, preset: str | None = None) -> Path:
    """A Hugging Face Qwen2 / Qwen3 / Llama directory -> a TiDAR checkpoint (`<output>/iter_0000000`) and the
    config to train it with (`<output>/config.yaml`: the architecture from config.json, the rest from --config)."""
    _check_output(Path(output), force)
    if preset:
        load_config(preset)  # a bad preset name fails here, before a process starts
    return in_fresh_process(import_hf_local, str(hf_dir), str(output), tensor_parallel, pipeline_parallel,
                            mask_token_id, force, preset)


def export(checkpoint_dir, output_dir, tokenizer=None, force: bool = False) -> Path:
    """A TiDAR checkpoint (any TP/PP) -> a Hugging Face directory `AutoModelForCausalLM` loads."""
    _check_output(Path(output_dir), force)
    _check_tokenizer(tokenizer)
    return in_fresh_process(export_local, str(checkpoint_dir), str(output_dir),
                             str(tokenizer) if tokenizer else None, force)


# --- command lines --------------------------------------------------------------------------------
def _run(parser, argv, call) -> int:
    args = parser.parse_args(argv)
    try:
        print(call(args))
    except (ConvertError, ConfigError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def import_hf_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron import-hf", description=import_hf.__doc__)
    parser.add_argument("--hf", required=True, help="Hugging Face model directory (config.json + safetensors)")
    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument("--config", help="preset or YAML to take the training settings from (default: built-in "
                        "defaults); the architecture always comes from the Hugging Face config.json")
    parser.add_argument("--tp", type=int, help="the TP to write into config.yaml and check the architecture "
                        "against (default: the preset's); the checkpoint itself loads at any layout")
    parser.add_argument("--pp", type=int, help="the PP for config.yaml (default: the preset's)")
    parser.add_argument("--mask-token-id", type=int, help="an existing token to use as the mask token "
                        "(default: the checkpoint's tidar_mask_token_id, else a new id = vocab_size)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    return _run(parser, argv, lambda a: import_hf(a.hf, a.output, a.tp, a.pp, a.mask_token_id, a.force, a.config))


def export_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron export", description=export.__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (with `latest`) or iter_*")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create")
    parser.add_argument("--tokenizer", help="tokenizer.model file or tokenizer directory to copy")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    return _run(parser, argv, lambda a: export(a.checkpoint, a.output, a.tokenizer, a.force))
