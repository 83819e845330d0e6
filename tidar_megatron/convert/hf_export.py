"""`tidar-megatron export`: a TiDAR Megatron checkpoint (any TP/PP) -> a Hugging Face directory.

    tidar-megatron export --checkpoint <ckpt> --output <dir> [--tokenizer PATH] [--chat-template FILE] [--force]

The directory loads in `transformers.AutoModelForCausalLM` (and in vLLM / SGLang as a plain Qwen/Llama
model) and carries `tidar_mask_token_id` / `tidar_draft_block_size` for TiDAR decoding, the tokenizer and
generation_config.json (eos).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tidar_megatron.atomic import atomic_dir
from tidar_megatron.config import ConfigError, from_dict
from tidar_megatron.console import entry_point
from tidar_megatron.convert.hf_import import check_output
from tidar_megatron.convert.mapping import ConvertError, architecture, hf_config, megatron_to_hf
from tidar_megatron.convert.process import in_fresh_process, single_rank_model

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


def check_shapes(path: Path, model):
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


def _check_inputs(tokenizer, chat_template) -> tuple[Path | None, Path | None]:
    if tokenizer and not Path(tokenizer).exists():
        raise ConvertError(f"tokenizer {tokenizer}: not found; pass a tokenizer.model file or a tokenizer directory")
    if chat_template and not Path(chat_template).is_file():
        raise ConvertError(f"chat template {chat_template}: not found; pass a Jinja template file")
    return (Path(tokenizer) if tokenizer else None), (Path(chat_template) if chat_template else None)


def _eos_id(tokenizer: Path | None) -> int | None:
    """The tokenizer's end-of-document id: generation_config.json's eos_token_id, where decoding stops."""
    if tokenizer is None:
        return None
    from tidar_megatron.data.tokenizer import Tokenizer, TokenizerError

    try:
        return Tokenizer(str(tokenizer)).eod_id
    except TokenizerError as e:
        raise ConvertError(str(e)) from None


def export_local(checkpoint_dir, output_dir, tokenizer=None, force: bool = False, chat_template=None) -> Path:
    """Export in this process; needs a single-rank Megatron session (`process.session`)."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import save_file

    from tidar_megatron.training.checkpoint import CheckpointError, load_model_weights

    output = Path(output_dir)
    check_output(output, force)
    tokenizer, chat_template = _check_inputs(tokenizer, chat_template)
    path = resolve_checkpoint(Path(checkpoint_dir))
    common = dist_checkpointing.load_common_state_dict(str(path))
    if "config" not in common:
        raise ConvertError(f"{path}: has no saved config; is it a tidar_megatron checkpoint?")
    try:
        cfg = from_dict(common["config"], source=f"{path} (saved config)")
        architecture(cfg)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    model = single_rank_model(cfg)
    check_shapes(path, model)
    try:
        load_model_weights([model], path)
    except CheckpointError as e:
        raise ConvertError(str(e)) from None
    params = {n: p.detach() for n, p in model.named_parameters()}
    dtype = params["decoder.final_layernorm.weight"].dtype
    eos = _eos_id(tokenizer)
    with atomic_dir(output) as tmp:
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
        if chat_template is not None:
            shutil.copy(chat_template, tmp / "chat_template.jinja")
    return output


def export(checkpoint_dir, output_dir, tokenizer=None, force: bool = False, chat_template=None) -> Path:
    """A TiDAR checkpoint (any TP/PP) -> a Hugging Face directory `AutoModelForCausalLM` loads."""
    check_output(Path(output_dir), force)
    _check_inputs(tokenizer, chat_template)
    return in_fresh_process(export_local, str(checkpoint_dir), str(output_dir),
                            str(tokenizer) if tokenizer else None, force,
                            str(chat_template) if chat_template else None)


@entry_point("tidar-megatron export")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tidar-megatron export", description=export.__doc__)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (with `latest`) or iter_*")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create")
    parser.add_argument("--tokenizer", help="tokenizer.model file or tokenizer directory to copy")
    parser.add_argument("--chat-template", help="a Jinja chat template to ship with the tokenizer "
                        "(chat_template.jinja), for chat completions")
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    a = parser.parse_args(argv)
    print(export(a.checkpoint, a.output, a.tokenizer, a.force, a.chat_template))
    return 0
