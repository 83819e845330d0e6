"""`make quickstart`'s pipeline on a reduced budget, checked against what it tells the user: a finite
training loss that fell, an exported directory that `transformers` loads and that gives the model's
logits, greedy TiDAR output identical to greedy AR output, the explained decoding summary, and a rerun
that reports the finished run instead of training again.  The pipeline runs with every optional extra
hidden, as `make quickstart` installs none of them."""

import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def extras_modules() -> list[str]:
    """The import names of every distribution an extra of pyproject.toml adds (those installed here); in a
    namespace that core dependencies share (nvidia), the extra's own subpackages."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {Requirement(r).name.lower().replace("_", "-") for reqs in extras.values() for r in reqs}
    names.discard("tidar-megatron")
    modules = set()
    for module, dists in importlib.metadata.packages_distributions().items():
        own = {d for d in dists if d.lower().replace("_", "-") in names}
        if own and len(own) == len(set(dists)):
            modules.add(module)
        for dist in own if own and len(own) < len(set(dists)) else ():
            modules |= {f"{module}.{f.parts[1]}" for f in importlib.metadata.files(dist) or ()
                        if len(f.parts) == 3 and f.parts[0] == module and f.name == "__init__.py"}
    return sorted(modules)


def without_extras(tmp_path) -> dict:
    """An environment whose Python cannot import the extras (`sys.modules[name] = None`: an import raises
    ModuleNotFoundError, find_spec answers None, as if they were not installed)."""
    site = tmp_path / "no_extras"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import sys\nfor name in {extras_modules()!r}:\n    sys.modules[name] = None\n")
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))


def test_make_quickstart_installs_the_package_alone_and_make_test_the_extras(tmp_path):
    venv = tmp_path / "venv"  # absent: make prints the commands that would create and fill it
    quickstart = subprocess.run(["make", "-n", "quickstart", f"VENV={venv}"], cwd=REPO, capture_output=True,
                                text=True, timeout=60)
    installs = [line for line in quickstart.stdout.splitlines()
                if line.startswith(f"{venv}/bin/python -m pip install") and "--upgrade pip" not in line]
    assert installs == [f"{venv}/bin/python -m pip install -q -e ."], quickstart.stdout
    test = subprocess.run(["make", "-n", "test", f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert f"{venv}/bin/python -m pip install -q -e '.[test,dali,zstd]'" in test.stdout.splitlines(), test.stdout
    assert {"transformers", "lm_eval", "wandb", "fastapi", "nvidia.dali"} <= set(extras_modules())


@pytest.mark.slow
def test_quickstart_pipeline(tmp_path):
    out = tmp_path / "qs"
    cmd = [sys.executable, "-m", "tidar_megatron", "quickstart", "--out", str(out), "--steps", "30",
           "--corpus-mb", "1", "--vocab-size", "512", "--seq-length", "32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=without_extras(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout + proc.stderr
    assert "Warning" not in printed, printed  # third-party noise is filtered in the entry point
    for stage in range(1, 6):
        assert printed.count(f"[{stage}/5]") == 1, printed
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "iter_0000030" and (ckpt / "loss.png").stat().st_size
    losses = [float(x) for x in re.findall(r"^step \d+/30 loss ([\d.]+)", (ckpt / "train.log").read_text(), re.M)]
    # Finite and falling: below the first logged value and well below a uniform guess over the vocabulary.
    assert len(losses) == 3 and all(map(math.isfinite, losses)), losses
    assert losses[-1] < losses[0] and losses[-1] < math.log(512) - 1.0, losses

    summary = json.loads((out / "summary.json").read_text())
    tidar = summary["decoding"]["tidar"]
    assert tidar["greedy_identical_fraction"] == 1.0 and tidar["tokens_per_pass"] >= 1.0
    assert math.isfinite(summary["likelihood"]["ar_perplexity"])
    assert "tokens per forward pass" in printed and "Greedy TiDAR output equals greedy AR output for 100%" in printed
    assert "def fibonacci(n):" in printed  # the prompt is echoed with its completion
    repetition = tidar["repetition"]  # beside T/NFE, and in words when the figure comes from degenerate text
    assert set(repetition) == {"loop_fraction", "distinct_1", "distinct_2", "degenerate"}
    assert f"{repetition['loop_fraction']:.0%} of the tokens repeat a loop" in printed
    assert ("tokens per pass come from degenerate output" in printed) == repetition["degenerate"]

    transformers = pytest.importorskip("transformers")
    from tidar_megatron.inference.hf_checkpoint import load_hf_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32)
    ours, _ = load_hf_model(out / "hf")
    tokens = torch.arange(1, 17)[None]
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens, torch.arange(16)[None], torch.ones(1, 16, 16, dtype=torch.bool).tril())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "holds a finished quickstart" in again.stdout and "nan" not in again.stdout + again.stderr
    assert (ckpt / "latest").read_text().strip() == "iter_0000030" and not (ckpt / "iter_0000031").exists()
