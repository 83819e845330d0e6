"""The prepared GPU check (benchmarks/gpu_suite.sh) in its dry run: every stage runs the same programs at
toy sizes on the CPU (kernels in Triton's interpreter) and writes the same files, so the first contact with
a GPU cannot fail for a trivial reason."""

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_figure(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["dry_run"] and list(results["stages"]) == ["environment", "gpu tests", "attention",
                                                               "training step", "decoding step"]
    for name, stage in results["stages"].items():
        assert stage["status"] == "passed", (name, Path(stage["log"]).read_text()[-3000:])
    assert results["environment"]["torch"] and "megatron-core" in results["environment"]
    kernel = [r for r in results["attention"]["rows"] if r["backend"] == "kernel"]
    assert kernel and "max |out - sdpa|" in kernel[0]["note"]
    runs = results["training"]["runs"]["none"]
    assert runs["TiDAR"]["ms_per_step"] > 0 and runs["AR"]["ms_per_step"] > 0 and runs["tidar_over_ar"] > 0
    assert runs["TiDAR"]["saved_activations_mib"] > runs["AR"]["saved_activations_mib"]  # the doubled sequence
    decoding = results["decoding"]["paths"]
    assert decoding["sdpa"]["ratio"] > 0 and decoding["kernel"]["ratio"] > 0 and "skipped" in decoding["compile"]
    md = (tmp_path / "results.md").read_text()
    assert "training step TiDAR / AR" in md and "| decoding step | passed |" in md
