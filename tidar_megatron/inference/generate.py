"""`tidar-megatron generate`: decode prompts with an exported Hugging Face checkpoint, TiDAR or plain AR.

    tidar-megatron generate --model <hf dir> --prompt "Once upon a time" [--mode tidar|ar]
        [--max-new-tokens N] [--temperature T] [--top-p P] [--block-size B] [--prompt-ids 1,2,3]
        [--attention sdpa|kernel]

Prints the generated text on stdout as it is accepted (batch 1) or per prompt (several --prompt), and a
summary on stderr: tokens/s, tokens per forward pass (T/NFE) and, for TiDAR, how many tokens each pass kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tidar_megatron.console import entry_point
from tidar_megatron.data.tokenizer import Tokenizer
from tidar_megatron.hf.config import DTYPES, NOT_A_MODEL_DIR, HFCheckpointNotFound
from tidar_megatron.inference.decoding import ATTENTION, MODES, Decoder, DecodingError
from tidar_megatron.inference.sampling import SamplingConfig
from tidar_megatron.inference.step import fit_context



def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    """A --dtype choice, or the default for the device: bfloat16 on GPU, float32 on CPU."""
    return DTYPES[name] if name else (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tidar-megatron generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face directory (config.json + safetensors)")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-ids", action="append", help="comma-separated token ids; repeat for a batch")
    p.add_argument("--mode", choices=MODES, default="tidar")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--block-size", type=int, help="draft block size (default: tidar_draft_block_size)")
    p.add_argument("--mask-token-id", type=int, help="mask token (default: tidar_mask_token_id)")
    p.add_argument("--beta", type=float, default=1.0, help="verify drafts against beta * AR + (1 - beta) * "
                   "diffusion logits: 1 = trust AR (lossless; sampling keeps the AR distribution), 0 = trust "
                   "the drafts (changes the output distribution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile + CUDA graphs (GPU only)")
    p.add_argument("--attention", choices=ATTENTION, default="sdpa",
                   help="kernel: the TiDAR Triton kernel (GPU; on CPU only under TRITON_INTERPRET=1)")
    return p


def load_tokenizer(model_dir: Path):
    """The tokenizer training used (tidar_megatron.data.tokenizer): the directory's SentencePiece
    `tokenizer.model`, else its Hugging Face tokenizer files."""
    if (model_dir / "tokenizer.model").is_file():
        return Tokenizer(str(model_dir / "tokenizer.model"))
    if (model_dir / "tokenizer.json").is_file() or (model_dir / "tokenizer_config.json").is_file():
        return Tokenizer(str(model_dir))
    raise DecodingError(f"{model_dir} has no tokenizer.model, tokenizer.json or tokenizer_config.json: "
                        "pass token ids with --prompt-ids instead")


def check_exported(model_dir, given: str | None = None):
    """A training checkpoint given where an exported directory belongs: say how to export it.  `given`: how the
    user passed it (default `--model <dir>`)."""
    path = Path(model_dir)
    if (path / "latest").is_file() or (path / "metadata.json").is_file() or any(path.glob("iter_[0-9]*")):
        given = given or f"--model {path}"
        raise HFCheckpointNotFound(f"{given} is a training checkpoint, not an exported model: export it first, "
                                   f"`tidar-megatron export --checkpoint {path} --output {path}-hf --tokenizer "
                                   "<the run's data.tokenizer>`, and pass the output directory")


def check_prompt_ids(prompts: list[list[int]], vocab_size: int, names: list[str]):
    """Every id inside the model's vocabulary; `names[i]` says where prompt i came from."""
    for ids, name in zip(prompts, names):
        if bad := [t for t in ids if not 0 <= t < vocab_size]:
            raise DecodingError(f"{name}: token id {bad[0]} is outside the model's vocabulary (ids 0..{vocab_size - 1})")


def parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise DecodingError(f"--prompt-ids expects comma-separated integers, got {text!r}") from None


@entry_point("tidar-megatron generate")
def main(argv=None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise HFCheckpointNotFound(f"--model {model_dir}: not found; {NOT_A_MODEL_DIR}")
    check_exported(model_dir)
    tokenizer = load_tokenizer(model_dir) if args.prompt else None
    prompts = [tokenizer.encode(t) for t in args.prompt] if tokenizer else [parse_ids(t) for t in args.prompt_ids]
    decoder = Decoder.from_pretrained(model_dir, resolve_dtype(args.dtype, args.device), args.device, args.mask_token_id, args.block_size,
                                      args.compile, args.attention, args.beta)
    names = [f"--prompt {t!r}" for t in args.prompt] if tokenizer else [f"--prompt-ids {t}" for t in args.prompt_ids]
    check_prompt_ids(prompts, decoder.model.args.vocab_size, names)
    max_new_tokens = []  # past the model's context: clamped, and said (inference/step.py)
    for prompt, name in zip(prompts, names):
        room, note = fit_context(len(prompt), args.max_new_tokens, decoder.max_positions, f"{name}: ",
                                 "--max-new-tokens")
        max_new_tokens.append(room)
        if note:
            print(note, file=sys.stderr)
    sampling = SamplingConfig(args.temperature, args.top_p)
    generated = [[] for _ in prompts]
    shown = ""
    if len(prompts) == 1 and tokenizer:  # a text completion is streamed right after its prompt
        print(args.prompt[0], end="", flush=True)
    for step in decoder.stream(prompts, max_new_tokens, args.mode, sampling, args.seed):
        for tokens, new in zip(generated, step.new_tokens):
            tokens += new
        if len(prompts) == 1:  # stream: print what the accepted tokens add to the text
            text = tokenizer.decode(generated[0]) if tokenizer else " ".join(map(str, generated[0]))
            print(text[len(shown):] if text.startswith(shown) else "\n" + text, end="", flush=True)
            shown = text
    if len(prompts) == 1:
        print()
    else:
        for i, tokens in enumerate(generated):
            print(f"[{i}] " + (args.prompt[i] + tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))))
    print(f"--- {step.stats.summary()} device={args.device}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
