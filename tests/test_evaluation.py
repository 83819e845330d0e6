"""`tidar-megatron evaluate` and its parts: likelihood against transformers, TiDAR vs AR decoding reports,
the sandboxed pass@1 runner, and one-line errors for bad inputs."""

import json
import math

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.evaluation import generation, likelihood, sandbox
from tidar_megatron.evaluation.evaluate import main
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.testing import repetitive_corpus, trained_toy_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MASK, BLOCK, VOCAB = 127, 4, 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Qwen2 checkpoint trained with the TiDAR loss on walks around a fixed cycle (drafts get accepted)."""
    path = tmp_path_factory.mktemp("trained")
    corpus = repetitive_corpus(256, 33, list(range(3, 67)), num_cycles=1, seed=0)
    trained_toy_checkpoint(path, corpus, 150, tidar_mask_token_id=MASK, tidar_draft_block_size=BLOCK,
                           eos_token_id=None)
    return path, corpus


def write_documents(prefix, documents):
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(VOCAB))
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def test_ar_likelihood_equals_transformers_window_by_window(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    path, corpus = trained
    g = torch.Generator().manual_seed(0)
    documents = [corpus[i, :n].tolist() for i, n in enumerate(torch.randint(2, 33, (9,), generator=g).tolist())]
    documents += [[5], corpus[20].tolist() + corpus[21].tolist()]  # a one-token document predicts nothing
    prefix = write_documents(tmp_path / "docs", documents)
    model, _ = load_hf_model(path)
    result = likelihood.score(model, likelihood.read_documents(prefix, VOCAB), 16, BLOCK, MASK, batch_size=3)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    nll = count = 0
    with torch.no_grad():
        for doc in documents:
            for start in range(0, len(doc), 16):
                window = torch.tensor([doc[start:start + 16]])
                if window.shape[1] > 1:  # transformers: mean cross-entropy over the shifted labels
                    nll += reference(window, labels=window).loss.item() * (window.shape[1] - 1)
                    count += window.shape[1] - 1
    assert result["tokens_scored"] == count and result["documents"] == len(documents)
    assert result["ar_nll"] == pytest.approx(nll / count, rel=1e-5)
    assert result["ar_perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert len(result["draft_accuracy"]) == BLOCK and 0 <= min(result["draft_accuracy"])
    assert result["diff_loss"] < math.log(VOCAB)  # trained drafts beat a uniform guess


def test_evaluate_command_reports_tidar_against_ar(trained, tmp_path, capsys):
    path, corpus = trained
    prompts = tmp_path / "prompts.jsonl"
    decoder = Decoder.from_pretrained(path)
    lines = []
    for i in range(4):
        ids = corpus[i, :6].tolist()
        reference = decoder.generate(ids, 16, mode="ar").tokens[0]
        # Without a tokenizer a completion reads "12 34 ...": stop at the first space, a valid expression.
        lines.append({"prompt_ids": ids, "reference": str(reference[0]), "stop": " ",
                      "tests": "assert True" if i % 2 else "assert False"})
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    prefix = write_documents(tmp_path / "docs", [corpus[i].tolist() for i in range(8)])
    out = tmp_path / "eval" / "results.json"
    assert main(["--model", str(path), "--data", prefix, "--seq-length", "16", "--prompts", str(prompts),
                 "--max-new-tokens", "16", "--block-size", "2", str(BLOCK), "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert {"ar_nll", "ar_perplexity", "tokens_scored", "tokens_per_pass", "greedy_identical_fraction"} <= set(results)
    tidar, ar = results["generation"]["tidar"], results["generation"]["ar"]
    assert set(tidar) == {"2", str(BLOCK)}
    for block, report in tidar.items():
        assert report["greedy_identical_fraction"] == 1.0 and report["exact_match"] == 1.0  # lossless, beta 1
        assert report["pass@1"] == 0.5 and report["new_tokens"] == 4 * 16
        assert len(report["acceptance_histogram"]) == int(block)
        assert sum(report["acceptance_histogram"]) == report["forward_passes"] - 4  # every pass but prefill
        assert report["tokens_per_pass"] == pytest.approx(report["new_tokens"] / report["forward_passes"])
        assert report["speedup_vs_ar"] == pytest.approx(report["tokens_per_s"] / ar["tokens_per_s"])
    assert tidar[str(BLOCK)]["tokens_per_pass"] > 2.0 and ar["tokens_per_pass"] == 1.0
    assert results["tokens_per_pass"] == tidar["2"]["tokens_per_pass"]  # the first block size asked for
    assert "| TiDAR | 4 |" in stdout and "| AR | - | 1.00 |" in stdout
    assert (out.parent / "acceptance.png").stat().st_size and out.with_suffix(".md").is_file()


@pytest.mark.parametrize("content,args,message", [
    (None, ["--prompts", "{dir}/missing.jsonl"], "missing.jsonl: not found"),
    ('{"prompt_ids": []}\n', ["--prompts", "{file}"], "p.jsonl:1: the prompt has no tokens"),
    ('{"prompt_ids": [1]}\n{"prompt": 5}\n', ["--prompts", "{file}"], "p.jsonl:2: prompt must be a string"),
    ('{"prompt": "hi"}\n', ["--prompts", "{file}"], "p.jsonl:1: a text prompt needs the model's tokenizer"),
    ('{"prompt_ids": [1, 999]}\n', ["--prompts", "{file}"], "token id 999 is outside the model's vocabulary"),
    (None, ["--data", "{docs}"], "token id 500 is outside the model's vocabulary (128 ids)"),
    (None, ["--data", "{dir}/nope"], "nope.bin not found"),
    (None, [], "nothing to evaluate"),
])
def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys, content, args, message):
    path, _ = trained
    file = tmp_path / "p.jsonl"
    if content is not None:
        file.write_text(content)
    docs = write_documents(tmp_path / "big", [[1, 2, 500]]) if "{docs}" in " ".join(args) else ""
    args = [a.format(dir=tmp_path, file=file, docs=docs) for a in args]
    assert main(["--model", str(path), "--output", str(tmp_path / "r.json"), "--quiet", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tidar-megatron evaluate: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "r.json").exists()


def test_sandbox_runs_tests_contained():
    assert sandbox.run_tests("def f(x):\n    return 2 * x\nassert f(3) == 6\n").passed
    failed = sandbox.run_tests("assert 1 == 2, 'wrong'\n")
    assert not failed.passed and "AssertionError: wrong" in failed.reason
    assert sandbox.run_tests("while True:\n    pass\n", timeout=2).reason == "timeout"
    assert not sandbox.run_tests("x = bytearray(8 << 30)\n", memory_mb=256).passed  # 8 GiB: refused
    network = sandbox.run_tests("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
    assert not network.passed and ("network" in network.reason or "Errno" in network.reason)
    # Runs in an empty temporary directory that is gone afterwards, not in this one.
    assert sandbox.run_tests("import os\nassert os.listdir('.') == ['program.py']\n").passed


def test_prompts_file_forms(tmp_path):
    file = tmp_path / "p.jsonl"
    file.write_text('{"prompt_ids": [1, 2], "reference": "x", "stop": "\\n"}\n\n{"prompt_ids": [3]}\n')
    prompts = generation.read_prompts(file, tokenizer=None)
    assert [p.ids for p in prompts] == [[1, 2], [3]] and prompts[0].stop == ["\n"] and prompts[0].reference == "x"
    assert generation.completion_text([4, 5], None, ["5"]) == "4 "
