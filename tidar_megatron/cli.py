"""`tidar-megatron <command>`: train, quickstart, layout, import-hf, export, generate."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("tidar_megatron.train", "pretrain a TiDAR model (--config <preset> --section.field value ...)"),
    "quickstart": ("tidar_megatron.quickstart", "tokenizer, data, a short CPU training run, decoding"),
    "layout": ("tidar_megatron.plots", "draw the doubled sequence and its attention mask to a PNG"),
    "generate": ("tidar_megatron.inference.generate", "TiDAR / AR decoding on an exported HF directory"),
    "import-hf": ("tidar_megatron.convert", "Hugging Face checkpoint -> TiDAR Megatron checkpoint"),
    "export": ("tidar_megatron.convert", "TiDAR Megatron checkpoint -> Hugging Face directory"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: tidar-megatron <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, f"{command.replace('-', '_')}_main", None) or module.main
    return entry(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
