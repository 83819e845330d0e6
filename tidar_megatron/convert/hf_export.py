"""`tidar-megatron export`: a TiDAR Megatron checkpoint (any TP/PP) -> a Hugging Face directory.

    tidar-megatron export --checkpoint <ckpt> --output <dir> [--tokenizer PATH] [--chat-template FILE]
        [--dtype auto|bfloat16|float16|float32] [--force]

The directory serves like the checkpoint's source: `transformers.AutoModelForCausalLM`, vLLM and SGLang load
it as the plain Llama / Mistral / Qwen model it came from, with the source's config.json fields (context
length, bos / eos ids, RoPE block, ...), generation_config.json and tokenizer files (with the chat template).
What TiDAR adds:
  * `tidar_mask_token_id`, `tidar_draft_block_size` in config.json, read by TiDAR decoding (and ignored by
    everything else);
  * when the mask token is a new id, one more vocabulary row (`vocab_size` grows by one); no tokenizer id maps
    to it, so engines never emit it unless asked to.
Weights are written in the training dtype (`train.bf16`) unless --dtype says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tidar_megatron.atomic import atomic_dir
from tidar_megatron.config import ConfigError, from_dict
from tidar_megatron.console import entry_point
from tidar_megatron.convert.hf_import import check_output
from tidar_megatron.convert.mapping import ConvertError, architecture, hf_files, megatron_to_hf
from tidar_megatron.convert.process import in_fresh_process, single_rank_model
from tidar_megatron.data.tokenizer import Tokenizer, TokenizerError
from tidar_megatron.hf.config import DTYPES

# megatron-core (seconds to import) and the training modules are imported inside the functions that run in
# the spawned conversion process (process.py): `export --help` and the calling process stay light.

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the newest loadable one of a run directory."""
    from tidar_megatron.training.checkpoint import find_resumable

    if (path / "metadata.json").is_file():
        return path
    found = find_resumable(path)
    if not found:
        raise ConvertError(f"{path}: no checkpoint (expected metadata.json or iter_* folders with a `latest`)")
    return found[0]


def _check_inputs(tokenizer, chat_template, dtype) -> tuple[Path | None, Path | None]:
    if tokenizer and not Path(tokenizer).exists():
        raise ConvertError(f"tokenizer {tokenizer}: not found; pass a tokenizer.model file or a tokenizer directory")
    if chat_template and not Path(chat_template).is_file():
        raise ConvertError(f"chat template {chat_template}: not found; pass a Jinja template file")
    if dtype not in (None, "auto", *DTYPES):
        raise ConvertError(f"--dtype {dtype}: choose auto (the training dtype), {', '.join(DTYPES)}")
    return (Path(tokenizer) if tokenizer else None), (Path(chat_template) if chat_template else None)


def _eos_id(tokenizer: Path | None) -> int | None:
    """The tokenizer's end-of-document id: where a from-scratch export's decoding stops (an import's export
    keeps its source's ids)."""
    if tokenizer is None:
        return None
    try:
        return Tokenizer(str(tokenizer)).eod_id
    except TokenizerError as e:
        raise ConvertError(str(e)) from None


def _copy_tokenizer(tokenizer: Path | None, chat_template: Path | None, out: Path):
    """The tokenizer's files (and a chat template) into `out`, without their mode bits: the export's files
    all get the permissions the umask gives new files."""
    if tokenizer is None:
        pairs = []
    elif tokenizer.is_file():
        pairs = [(tokenizer, "tokenizer.model")]
    else:
        pairs = [(tokenizer / name, name) for name in TOKENIZER_FILES if (tokenizer / name).is_file()]
    if chat_template is not None:
        pairs.append((chat_template, "chat_template.jinja"))
    for src, name in pairs:
        shutil.copyfile(src, out / name)


def _as_new_file(path: Path):
    """Give `path` the mode a new file gets under the umask (safetensors writes its files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def export_local(checkpoint_dir, output_dir, tokenizer=None, force: bool = False, chat_template=None,
                 dtype: str | None = None) -> Path:
    """Export in this process; needs a single-rank Megatron session (`process.session`)."""
    from megatron.core import dist_checkpointing

    from tidar_megatron.training.checkpoint import CheckpointError, load_model_weights

    output = Path(output_dir)
    check_output(output, force)
    tokenizer, chat_template = _check_inputs(tokenizer, chat_template, dtype)
    path = resolve_checkpoint(Path(checkpoint_dir))
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "config" not in common:
        raise ConvertError(f"{path}: has no saved config; is it a tidar_megatron checkpoint?")
    try:
        cfg = from_dict(common["config"], source=f"{path} (saved config)")
        architecture(cfg)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    if tokenizer is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        tokenizer = Path(cfg.data.tokenizer)  # the one it was trained (or imported) with
    model = single_rank_model(cfg)
    try:
        load_model_weights([model], path, "the saved config")
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    weight_dtype = DTYPES[dtype] if dtype and dtype != "auto" else torch.bfloat16 if cfg.train.bf16 else torch.float32
    params = {n: p.detach() for n, p in model.named_parameters()}
    weights = {k: v.to(weight_dtype) for k, v in megatron_to_hf(cfg, params).items()}
    config, generation = hf_files(cfg, weight_dtype, eos_token_id=_eos_id(tokenizer))
    with atomic_dir(output) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _as_new_file(tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        _copy_tokenizer(tokenizer, chat_template, tmp)
    return output


def describe(output: Path) -> str:
    """What an export directory holds, for people: its files, the weights' dtype, the vocabulary and the
    mask token, the context length."""
    config = json.loads((output / "config.json").read_text())
    rows, mask = config["vocab_size"], config["tidar_mask_token_id"]
    where = "the last row" if mask == rows - 1 else "an existing token's row"
    lines = [f"exported {output}:"]
    for f in sorted(output.iterdir()):
        what = {"model.safetensors": f"{config['dtype']} weights",
                "config.json": f"{config['model_type']}, vocabulary {rows} rows, mask token {mask} ({where}), "
                               f"context {config['max_position_embeddings']}"}.get(f.name, "")
        lines.append(f"  {f.name:<24} {_size(f.stat().st_size):>10}  {what}".rstrip())
    if not (output / "tokenizer.json").is_file() and not (output / "tokenizer.model").is_file():
        lines.append("  no tokenizer: pass --tokenizer to ship one")
    return "\n".join(lines)


def _size(num_bytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def export(checkpoint_dir, output_dir, tokenizer=None, force: bool = False, chat_template=None,
           dtype: str | None = None) -> Path:
    """A TiDAR checkpoint (any TP/PP) -> a Hugging Face directory `AutoModelForCausalLM` loads."""
    check_output(Path(output_dir), force)
    _check_inputs(tokenizer, chat_template, dtype)
    return in_fresh_process(export_local, str(checkpoint_dir), str(output_dir),
                            str(tokenizer) if tokenizer else None, force,
                            str(chat_template) if chat_template else None, dtype)


@entry_point("tidar-megatron export")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron export", description=export.__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (with `latest`) or iter_*")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create")
    parser.add_argument("--tokenizer", help="tokenizer.model file or tokenizer directory to copy (default: the "
                        "checkpoint's data.tokenizer, when it exists here)")
    parser.add_argument("--chat-template", help="a Jinja chat template to ship with the tokenizer "
                        "(chat_template.jinja), for chat completions")
    parser.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                        help="weights' dtype (default auto: the training dtype, bfloat16 with train.bf16)")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    a = parser.parse_args(argv)
    print(describe(export(a.checkpoint, a.output, a.tokenizer, a.force, a.chat_template, a.dtype)))
    return 0
