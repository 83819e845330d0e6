"""`python data_prep/train_tokenizer.py ...` = `tidar-megatron train-tokenizer ...`: a SentencePiece model
that is lossless for source code (see tidar_megatron.data.tokenizer)."""
# data_prep/ (first on sys.path when run as a script) holds tokenize.py, which would shadow the standard
# library's `tokenize` for every later import: drop the directory first (see data_prep/tokenize.py).
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from tidar_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train-tokenizer", *sys.argv[1:]]))
