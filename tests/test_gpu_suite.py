"""The prepared GPU check (benchmarks/gpu_suite.sh) in its dry run: every stage runs the same programs at
toy sizes on the CPU (kernels in Triton's interpreter) and writes the same files, so the first contact with
a GPU cannot fail for a trivial reason.  Also the pieces a short GPU window relies on: stages stopped with
everything they started, and the replication corpus (held-out files never trained on)."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _benchmark(name):
    """A benchmarks/ script as a module (registered, so that the scripts can import each other)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replicate, gpu_suite = _benchmark("replicate"), _benchmark("gpu_suite")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out / "gpu"),
                           "--bundle", str(out / "gpu.tar.gz")], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "gpu" / "results.json").read_text())


@pytest.mark.slow
def test_dry_run_passes_every_stage_in_order_of_worth(dry_run):
    _, results = dry_run
    assert results["dry_run"] and list(results["stages"]) == ["environment", "decoding step", "replication",
                                                               "training step", "attention", "gpu tests"]
    for name, stage in results["stages"].items():
        assert stage["status"] == "passed", (name, Path(stage["log"]).read_text()[-3000:])
    assert sum(gpu_suite.BUDGETS.values()) <= 570  # one 10-minute device command with the wheel install
    env = results["environment"]
    assert env["torch"] and "megatron-core" in env and env["installed_from_wheels"] == {}  # megatron was there


@pytest.mark.slow
def test_dry_run_writes_every_figure(dry_run):
    out, results = dry_run
    kernel = [r for r in results["attention"]["rows"] if r["backend"] == "kernel"]
    assert kernel and "max |out - sdpa|" in kernel[0]["note"]
    runs = results["training"]["runs"]["none"]
    assert runs["TiDAR"]["ms_per_step"] > 0 and runs["AR"]["ms_per_step"] > 0 and runs["tidar_over_ar"] > 0
    assert runs["TiDAR"]["saved_activations_mib"] > runs["AR"]["saved_activations_mib"]  # the doubled sequence
    decoding = results["decoding"]["paths"]
    assert decoding["sdpa"]["ratio"] > 0 and decoding["kernel"]["ratio"] > 0 and "skipped" in decoding["compile"]
    md = (out / "gpu" / "results.md").read_text()
    assert "training step TiDAR / AR" in md and "| decoding step | passed |" in md
    with tarfile.open(out / "gpu.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu/results.json", "gpu/results.md", "gpu/logs/replication.log", "gpu/replication/replicate.png"} <= names
    assert not any("-hf/" in n or "iter_" in n for n in names)  # no checkpoints in the bundle


@pytest.mark.slow
def test_dry_run_replicates_the_recipe_against_ar(dry_run):
    out, results = dry_run
    rep = results["replication"]
    ar, recipe = rep["runs"]["ar"], rep["runs"]["ar+tidar"]
    assert 1 < ar["ar_perplexity"] < 1024 and 1 < recipe["ar_perplexity"] < 1024  # vocabulary 512, 4 steps
    assert "tidar" not in ar  # --decode tidar: the AR baseline is scored, not decoded
    assert set(recipe["tidar"]) == {"4", "8", "16"}
    for block, row in recipe["tidar"].items():
        assert 1 <= row["tokens_per_pass"] <= int(block) and row["tokens_per_s"] > 0
        assert row["greedy_identical_fraction"] == 1.0  # beta = 1, fp32 on the CPU: lossless by construction
    assert rep["data"]["heldout_tokens"] > 0 and rep["data"]["corpus_tokens"] > rep["data"]["heldout_tokens"]
    assert rep["params"]["total"] > rep["params"]["embedding"] > 0
    assert set(rep["seconds"]) == {"data", "ar", "ar+tidar"} and rep["seconds"]["ar"]["train"] > 0
    assert rep["curves"]["ar+tidar"][-1]["step"] == 4  # the recipe's steps continue the AR run's
    md = (out / "gpu" / "results.md").read_text()
    for target in gpu_suite.TARGETS["perplexity"], gpu_suite.TARGETS["tokens per pass"], gpu_suite.TARGETS["speed"]:
        assert target in md
    assert "| replication: recipe decoding, B=8 |" in md and "## Replication" in md and rep["table"] in md


def test_replication_rows_do_not_count_a_degenerate_model_as_fast():
    fast = {"tokens_per_pass": 3.1, "tokens_per_s": 900.0, "speedup_vs_ar": 3.0, "greedy_identical_fraction": 1.0}
    loops = {"loop_fraction": 0.9, "distinct_1": 0.05, "distinct_2": 0.04, "degenerate": True}
    healthy = {"loop_fraction": 0.0, "distinct_1": 0.6, "distinct_2": 0.9, "degenerate": False}
    runs = {"ar": {"ar_perplexity": 10.0},
            "ar+tidar": {"ar_perplexity": 10.1, "ar": {"tokens_per_s": 300.0, "repetition": healthy},
                         "tidar": {"8": dict(fast, repetition=loops), "4": dict(fast, repetition=healthy)}}}
    rows = {line.split(" | ")[0]: line for line in gpu_suite.replication_rows({"runs": runs})}
    assert "(+1.0%, met)" in rows["| replication: held-out AR perplexity, recipe vs AR"]
    assert "DEGENERATE" in rows["| replication: recipe decoding, B=8"]
    assert "T/NFE 3.10 (missed)" in rows["| replication: recipe decoding, B=8"]
    assert "(3.00x, missed)" in rows["| replication: recipe decoding, B=8"]
    assert "(3.00x, met)" in rows["| replication: recipe decoding, B=4"]


def test_a_stage_out_of_time_is_stopped_with_what_it_started(tmp_path):
    child = tmp_path / "child.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(child)!r}, 'w')"
              ".write(str(p.pid)); time.sleep(60)")
    started = time.time()
    result = gpu_suite.run_stage("slow", 2, [sys.executable, "-c", script], tmp_path, dict(os.environ))
    assert result["status"] == "timed out after 2s" and time.time() - started < 2 + gpu_suite.KILL_GRACE_S + 2
    stat = Path(f"/proc/{int(child.read_text())}/stat")
    time.sleep(0.2)
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z"  # the grandchild ended too


def _tree(root: Path, files: dict[str, int]):
    for name, size in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x" * size)


def test_replication_corpus_continues_into_site_packages_and_holds_out_stdlib_files(tmp_path):
    kb = 1024
    stdlib, site = tmp_path / "lib", tmp_path / "site-packages"
    _tree(stdlib, {"a.py": 300 * kb, "b.py": 300 * kb, "c.py": 200 * kb, "d.py": 100 * kb, "test/t.py": kb})
    _tree(site, {"pkg/m.py": 100 * kb, "pkg/tests/t.py": kb, "pkg/table.py": 300 * kb, "zz/n.py": 200 * kb})
    mb = kb * kb / 2**20 / kb  # one KB in MB

    train, heldout = replicate.corpus_files(600 * mb, 300 * mb, stdlib, [site])  # fits in the stdlib
    assert [Path(f).name for f in train] == ["a.py", "b.py"] and [Path(f).name for f in heldout] == ["c.py", "d.py"]

    train, heldout = replicate.corpus_files(1300 * mb, 100 * mb, stdlib, [site])  # more than the stdlib holds
    assert [Path(f).name for f in heldout] == ["d.py"]  # held out: standard-library files only
    assert [str(Path(f).relative_to(tmp_path)) for f in train] == [
        "lib/a.py", "lib/b.py", "lib/c.py", "site-packages/pkg/m.py", "site-packages/zz/n.py"]  # no tests, no > 256 KB
