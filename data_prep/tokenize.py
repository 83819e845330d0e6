"""`python data_prep/tokenize.py ...` = `tidar-megatron tokenize ...`: corpora -> Megatron .bin/.idx."""
# This file is named like the standard library's `tokenize`, and `python data_prep/tokenize.py` puts
# data_prep/ first on sys.path, so `import tokenize` (done by linecache, inspect, torch, ...) would load
# this script instead.  Drop the script's own directory before any other import.
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

from tidar_megatron.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
