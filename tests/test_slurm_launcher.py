"""What the Slurm launchers hand the trainer, with `srun` replaced by a stub that prints its arguments (no
Slurm needed): the continual recipe takes INIT_FROM's config.yaml and weights, FROM_SCRATCH=1 selects the
scratch preset, and without either the recipe preset is used as is (the trainer then refuses to start
from random weights: test_config / test_cli)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidar_megatron.config import load_config
from tidar_megatron.training.preflight import check_checkpoints

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def launch(tmp_path):
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (stub / "srun").chmod(0o755)

    def run(script, **env):
        full = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "TIDAR_HOME": str(REPO), "VENV": sys.prefix,
                "MASTER_ADDR": "node0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "1", **env}
        proc = subprocess.run(["bash", str(REPO / "slurm" / script), "--data.blend", "d"], env=full,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        args = proc.stdout.splitlines()
        return args[args.index("--config") + 1:]
    return run


def test_launchers_pass_the_recipe_and_its_initial_checkpoint(launch, tmp_path):
    init = tmp_path / "init-1p5b"
    init.mkdir()
    (init / "config.yaml").write_text("{}")
    args = launch("pretrain_1p5b.sh", INIT_FROM=str(init))
    assert args[0] == str(init / "config.yaml")
    assert args[args.index("--checkpoint.init_from") + 1] == str(init) and args[-2:] == ["--data.blend", "d"]
    assert launch("pretrain_8b.sh", FROM_SCRATCH="1")[0] == "8b-scratch"
    plain = launch("pretrain_1p5b.sh")
    assert plain[0] == "1p5b" and "--checkpoint.init_from" not in plain


def test_the_continual_recipe_refuses_random_weights(tmp_path):
    from tidar_megatron.config import ConfigError

    cfg = load_config("1p5b", ["--checkpoint.dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="continues an AR checkpoint .*import-hf.*-scratch preset"):
        check_checkpoints(cfg)
    check_checkpoints(load_config("1p5b-scratch", ["--checkpoint.dir", str(tmp_path)]))
