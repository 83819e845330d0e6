"""`tidar-megatron evaluate` and its parts: likelihood against transformers, TiDAR vs AR decoding reports,
the sandboxed pass@1 runner, and one-line errors for bad inputs."""

import json
import math

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from tidar_megatron.evaluation import generation, likelihood, repetition, sandbox
from tidar_megatron.evaluation.evaluate import main
from tidar_megatron.inference.decoding import Decoder
from tidar_megatron.inference.hf_checkpoint import load_hf_model
from tidar_megatron.testing import repetitive_corpus, save_weights, tiny_hf_checkpoint, trained_toy_checkpoint

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
    for report in [ar, *tidar.values()]:  # walks around a 64-token cycle: 16 new tokens never repeat
        assert report["repetition"] == {"loop_fraction": 0.0, "distinct_1": 1.0, "distinct_2": 1.0, "degenerate": False}
    assert "| 0% | 1.00 / 1.00 |" in stdout and "Degenerate" not in stdout
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


# --- repetition: degenerate text must not pass as a speed-up ------------------------------------------------
def looped_by_brute_force(tokens: list[int]) -> list[bool]:
    """repetition.loop_mask's rule checked token by token: for each period, grow the stretch of repeats around
    the token both ways and test its length."""
    n, out = len(tokens), [False] * len(tokens)
    for i in range(n):
        for p in range(1, repetition.MAX_PERIOD + 1):
            if i < p or tokens[i] != tokens[i - p]:
                continue
            lo, hi = i, i
            while lo - 1 >= p and tokens[lo - 1] == tokens[lo - 1 - p]:
                lo -= 1
            while hi + 1 < n and tokens[hi + 1] == tokens[hi + 1 - p]:
                hi += 1
            if hi - lo + 1 >= max((repetition.MIN_REPEATS - 1) * p, repetition.MIN_LOOP_TOKENS):
                out[i] = True
    return out


def test_loop_mask_equals_brute_force_on_planted_loops():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        pieces = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=g))):
            pieces += torch.randint(0, 6 if trial % 2 else 50, (int(torch.randint(0, 30, (1,), generator=g)),),
                                    generator=g).tolist()
            period, times = int(torch.randint(1, 40, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
            pieces += torch.randint(0, 50, (period,), generator=g).tolist() * times   # a planted loop
        assert repetition.loop_mask(pieces).tolist() == looped_by_brute_force(pieces), pieces


def test_repetition_flags_one_token_and_short_loops_not_real_code(corpus):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    newline_only = repetition.measure([[7] * 48] * 3)
    assert newline_only == {"loop_fraction": 47 / 48, "distinct_1": 1 / 48, "distinct_2": 1 / 47, "degenerate": True}
    assert repetition.measure([[5, 9, 12, 9] * 12])["degenerate"]                      # a phrase over and over
    assert repetition.measure([list(range(40)) + [3] * 8])["loop_fraction"] == 0.0      # 8 equal tokens: 7 repeats
    assert repetition.measure([[1, 2, 1, 2]]) == {"loop_fraction": 0.0, "distinct_1": 0.5, "distinct_2": 2 / 3,
                                                       "degenerate": False}
    assert repetition.measure([]) == {"loop_fraction": 0.0, "distinct_1": 1.0, "distinct_2": 1.0, "degenerate": False}
    # Real source code (the standard library, tokenized) in 48-token completions: varied text.
    documents = IndexedDataset(corpus["prefix"])
    samples = [documents[d][start:start + 48].tolist() for d in range(len(documents))
               for start in range(0, len(documents[d]) - 48, 480)]
    healthy = repetition.measure(samples)
    assert len(samples) > 100 and healthy["loop_fraction"] < 0.05 and not healthy["degenerate"], healthy
    assert healthy["distinct_1"] > 0.5 and repetition.degenerate_note(healthy, 7.5, "TiDAR") is None


def test_evaluate_says_when_tokens_per_pass_come_from_degenerate_output(tmp_path, capsys):
    """A model that emits one token forever: its drafts are always right, so tokens per pass nears the block
    size.  The report flags the text beside T/NFE and says in words that the figure is no speed-up."""
    path = tmp_path / "constant"
    tiny_hf_checkpoint(path, "qwen2", tidar_mask_token_id=MASK, tidar_draft_block_size=BLOCK, eos_token_id=None)
    model, _ = load_hf_model(path)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0, again and again
    save_weights(model, path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt_ids": [3 + i, 40 + i, 9]}) for i in range(3)) + "\n")
    out = tmp_path / "results.json"
    assert main(["--model", str(path), "--prompts", str(prompts), "--max-new-tokens", "32", "--output", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    generation = json.loads(out.read_text())["generation"]
    assert all(sample["ar"] == " ".join(["0"] * 32) for sample in generation["samples"])
    tidar = generation["tidar"][str(BLOCK)]
    assert tidar["tokens_per_pass"] > 3.0  # the figure that used to pass as a speed-up
    for report in (generation["ar"], tidar):
        assert report["repetition"] == {"loop_fraction": 31 / 32, "distinct_1": 1 / 32, "distinct_2": 1 / 31,
                                        "degenerate": True}
    assert "| 97% (degenerate) | 0.03 / 0.03 |" in stdout
    assert f"**Degenerate output.** TiDAR block {BLOCK}'s {tidar['tokens_per_pass']:.2f} tokens per pass come from " \
           "degenerate output: 97% of the generated tokens repeat a loop" in stdout
    assert "says nothing about decoding real text" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_an_ar_objective_export_decoded_in_tidar_mode_is_flagged(corpus, tmp_path, capsys):
    """The reported case: a checkpoint trained with `tidar.objective: ar` (its mask-token rows never trained),
    exported and decoded in TiDAR mode, repeats itself; evaluate must say so rather than report a speed-up."""
    import subprocess
    import sys

    run = [sys.executable, "-m", "tidar_megatron"]
    train = run + ["train", "--config", "tiny", "--tidar.objective", "ar", "--data.blend", corpus["prefix"],
                   "--data.tokenizer", corpus["tokenizer"], "--data.split", "90,10,0", "--train.train_steps", "30",
                   "--train.eval_interval", "30", "--train.eval_iters", "1", "--log.wandb_mode", "disabled",
                   "--checkpoint.dir", str(tmp_path / "ckpt")]
    for command in (train, run + ["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"),
                                  "--tokenizer", corpus["tokenizer"]]):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (
        "def parse_args(self, args=None):\n        ", "class Formatter:\n    def __init__(self, width):\n", "import ")))
    out = tmp_path / "results.json"
    assert main(["--model", str(tmp_path / "hf"), "--prompts", str(prompts), "--max-new-tokens", "48",
                 "--output", str(out), "--device", "cpu", "--quiet"]) == 0
    stdout = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert results["block_sizes"] == [8]  # the tiny preset's block, read from the export
    tidar = results["generation"]["tidar"]["8"]
    assert tidar["repetition"]["degenerate"] and tidar["repetition"]["loop_fraction"] >= 0.5, tidar["repetition"]
    assert f"**Degenerate output.** TiDAR block 8's {tidar['tokens_per_pass']:.2f} tokens per pass" in stdout
