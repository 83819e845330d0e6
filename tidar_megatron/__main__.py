"""`python -m tidar_megatron <command> ...` (what the Slurm launchers and torchrun run): the CLI."""

import sys

from tidar_megatron.cli import main

sys.exit(main())
