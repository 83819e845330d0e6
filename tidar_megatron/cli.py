"""`tidar-megatron <command> [args]`: every entry point of the stack, one error and exit-code convention.

Subcommands print a user error as `tidar-megatron <command>: error: <message>` and exit with 2 (argparse's
code for bad arguments); 0 is success; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module with `main(argv)`, one line of help); modules are imported only when their command runs.
COMMANDS = {
    "quickstart": ("tidar_megatron.quickstart", "the whole pipeline on the embedded corpus, on a CPU, in minutes"),
    "train-tokenizer": ("tidar_megatron.data.tokenizer", "train a SentencePiece tokenizer lossless for code"),
    "tokenize": ("tidar_megatron.data.tokenize_corpus", "JSONL / text / source trees -> Megatron .bin/.idx"),
    "train": ("tidar_megatron.training.loop", "pretrain (--config <preset> --section.field value ...; --help "
              "lists every field)"),
    "import-hf": ("tidar_megatron.convert.hf_import", "Hugging Face checkpoint -> TiDAR Megatron checkpoint"),
    "export": ("tidar_megatron.convert.hf_export", "TiDAR Megatron checkpoint -> Hugging Face directory"),
    "generate": ("tidar_megatron.inference.generate", "TiDAR / AR decoding on an exported directory"),
    "evaluate": ("tidar_megatron.evaluation.evaluate", "perplexity, tokens per pass, TiDAR vs AR speed and outputs"),
    "lm-eval": ("tidar_megatron.evaluation.lm_eval_model", "lm-evaluation-harness with the `tidar` model type "
                "(lm_eval's arguments)"),
    "serve": ("tidar_megatron.serving.server", "an OpenAI-compatible TiDAR server (continuous batching)"),
    "layout": ("tidar_megatron.plots", "draw the doubled sequence and its attention mask to a PNG"),
}


# Packages of optional extras (pyproject.toml) that a command may need -> the extra that installs them.
OPTIONAL = {"lm_eval": "eval", "accelerate": "eval", "fastapi": "serve", "uvicorn": "serve",
            "prometheus_client": "serve", "transformers": "hf"}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: tidar-megatron <command> [args]   (tidar-megatron <command> --help for its arguments)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        near = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        print(f"tidar-megatron: error: unknown command '{command}'{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in OPTIONAL:
            extra = OPTIONAL[e.name.split(".")[0]]
            print(f"tidar-megatron {command}: error: needs {e.name.split('.')[0]}; pip install "
                  f"'tidar_megatron[{extra}]'", file=sys.stderr)
            return 2
        raise
    return module.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
