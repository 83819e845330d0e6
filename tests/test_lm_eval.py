"""The `tidar` model type for lm-evaluation-harness, offline on local task YAMLs written here.

On one exported-style directory (a tiny Llama with our SentencePiece tokenizer.model): the `tidar` model's
log-likelihoods and greedy generations equal lm-eval's own `hf` model's (a second implementation:
transformers' modeling code and generate) on multiple-choice, rolling-loglikelihood and generation tasks with
different settings pooled into one batch; generate_until gives the same answers in tidar and ar mode; a code
task is scored by the project's sandboxed pass@1; requests with different settings never share a batch;
answers reach lm-eval's cache hook; degenerate output is flagged in the decoding record; and the documented
`tidar-megatron lm-eval` command lines run on a CPU with and without --device and device= in --model_args.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from multirank import run_on_ranks

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\nfor i in range(10):\n    print(i * i)\n") * 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece
    from tidar_megatron.testing import tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("lm_eval")
    model = root / "model"
    model.mkdir()
    train_sentencepiece([TEXT], str(model / "tokenizer.model"), vocab_size=320)
    tok = Tokenizer(str(model / "tokenizer.model"))
    tiny_hf_checkpoint(model, "llama", vocab_size=tok.vocab_size, initializer_range=0.2, max_position_embeddings=64,
                       tidar_mask_token_id=tok.mask_id, tidar_draft_block_size=3, eos_token_id=tok.eod_id,
                       bos_token_id=1)
    tasks = root / "tasks"
    tasks.mkdir()
    data = {
        "mc": [{"question": f"x = {i}\nprint(", "choices": ["x)", "y)", "x + 1)"], "answer": i % 3} for i in range(6)],
        "gen": [{"prompt": p, "answer": "a"} for p in ("def add(a, b):\n", "class Point:\n", "for i in ", "x = ")],
        "code": [{"prompt": "x = 1  # ", "test": "assert x == 1"}, {"prompt": "x = 1  # ", "test": "assert x == 2"}],
        "rolling": [{"text": TEXT[:300]}, {"text": TEXT[50:200]}],
    }
    for name, rows in data.items():
        (tasks / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    yamls = {
        "mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
              "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
        "short": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                 "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 2\n  do_sample: false\n"
                 "metric_list:\n  - metric: exact_match\n",
        "gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
               "generation_kwargs:\n  until: ['\\n\\n']\n  max_gen_toks: 12\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n",
        "code": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{test}}'\n"
                "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
                "process_results: !function tidar_utils.process_results\n"
                "metric_list:\n  - metric: pass@1\n    aggregation: mean\n    higher_is_better: true\n",
        "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: '{{text}}'\ndoc_to_target: '{{text}}'\n"
                   "metric_list:\n  - metric: word_perplexity\n",
    }
    for name, body in yamls.items():
        rows = "gen" if name == "short" else name  # the same prompts as tiny_gen, 2 tokens instead of 12
        (tasks / f"tiny_{name}.yaml").write_text(f"task: tiny_{name}\n" + common.format(path=tasks / f"{rows}.jsonl")
                                                 + body)
    (tasks / "tidar_utils.py").write_text(
        "from tidar_megatron.evaluation.lm_eval_model import code_pass_at_1 as process_results  # noqa: F401\n")
    return {"model": str(model), "tasks": str(tasks)}


def _evaluate(rank, world_size, model_dir, task_dir, runs):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import tidar_megatron.evaluation.lm_eval_model  # noqa: F401  (registers "tidar")

    manager = TaskManager(include_path=task_dir)
    out = {}
    for name, (model, args, tasks) in runs.items():
        results = lm_eval.simple_evaluate(model=model, model_args=f"pretrained={model_dir},dtype=float32,{args}",
                                          tasks=tasks, task_manager=manager, log_samples=True, device="cpu",
                                          batch_size=2)
        out[name] = {"samples": {t: [s["resps"] for s in results["samples"][t]] for t in tasks},
                     "results": results["results"], "config": results["config"]}
    return out


@pytest.mark.slow
def test_tidar_model_matches_lm_evals_hf_model_and_decodes_losslessly(setup):
    generation = ["tiny_gen", "tiny_short", "tiny_code"]  # 12, 2 and 6 tokens: pooled into batches of 2
    runs = {"hf": ("hf", "", ["tiny_mc", "tiny_rolling", *generation]),
            "tidar": ("tidar", "mode=tidar,block_size=3", ["tiny_mc", "tiny_rolling", *generation]),
            "ar": ("tidar", "mode=ar", ["tiny_gen"])}
    out = run_on_ranks(1, _evaluate, setup["model"], setup["tasks"], runs, env=OFFLINE, timeout=900)[0]
    for task in ("tiny_mc", "tiny_rolling"):
        hf, ours = out["hf"]["samples"][task], out["tidar"]["samples"][task]
        assert len(hf) == len(ours) > 0
        for hf_doc, our_doc in zip(hf, ours):
            for (hf_resp,), (our_resp,) in zip(hf_doc, our_doc):
                hf_ll = hf_resp[0] if isinstance(hf_resp, (list, tuple)) else hf_resp
                our_ll = our_resp[0] if isinstance(our_resp, (list, tuple)) else our_resp
                assert our_ll == pytest.approx(hf_ll, rel=1e-4), task
    for task in generation:
        assert out["tidar"]["samples"][task] == out["hf"]["samples"][task], task
    assert out["tidar"]["samples"]["tiny_gen"] == out["ar"]["samples"]["tiny_gen"]  # greedy: lossless
    assert out["tidar"]["results"]["tiny_code"]["pass@1,none"] == 0.5  # the sandbox ran both tests
    decoding = out["tidar"]["config"]["tidar_decoding"]
    assert decoding["mode"] == "tidar" and decoding["block_size"] == 3 and decoding["tokens_per_pass"] >= 1.0
    assert sum(decoding["acceptance_histogram"]) > 0
    assert set(decoding["repetition"]) == {"loop_fraction", "distinct_1", "distinct_2", "degenerate"}
    assert out["ar"]["config"]["tidar_decoding"]["tokens_per_pass"] == 1.0




def requests(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_requests_with_different_generation_settings_never_share_a_batch(setup, tmp_path):
    """The reported case: max_gen_toks 2 and 12 gave 14 tokens at batch 1 but 4 at batch 2.  Every answer also
    reaches lm-eval's cache hook as it is made (what --use_cache keeps of an interrupted run)."""
    from lm_eval.api.model import CachingLM, hash_args

    from tidar_megatron.evaluation.lm_eval_model import TiDARLM

    generate = requests("generate_until", [("def add(a, b):\n", {"until": ["never"], "max_gen_toks": n,
                                                                  "do_sample": False}) for n in (2, 12)])
    likelihood = requests("loglikelihood", [("x = ", "1"), ("class ", "Point:")])
    rolling = requests("loglikelihood_rolling", [("for i in range(10):\n",)])
    answers = {}
    for batch_size in (1, 2):
        lm = TiDARLM(pretrained=setup["model"], block_size=3, device="cpu", batch_size=batch_size)
        cache = CachingLM(lm, str(tmp_path / f"cache{batch_size}.db")).dbdict  # hands `lm` lm-eval's cache hook
        answers[batch_size] = lm.generate_until(generate)
        assert lm.decoding_stats()["new_tokens"] == 2 + 12
        assert [cache[hash_args("generate_until", r.args)] for r in generate] == answers[batch_size]
    assert answers[1] == answers[2] and len(answers[1][1]) > len(answers[1][0])
    scores, total = lm.loglikelihood(likelihood), lm.loglikelihood_rolling(rolling)
    assert [tuple(cache[hash_args("loglikelihood", r.args)]) for r in likelihood] == [tuple(x) for x in scores]
    assert cache[hash_args("loglikelihood_rolling", rolling[0].args)] == total[0]


def test_decoding_record_flags_degenerate_output(setup, tmp_path, caplog):
    """A model that emits one token forever keeps every draft: tokens per pass nears the block size, and the
    record under config.tidar_decoding must say the figure comes from degenerate output."""
    import shutil

    from tidar_megatron.evaluation.lm_eval_model import TiDARLM
    from tidar_megatron.inference.hf_checkpoint import load_hf_model
    from tidar_megatron.testing import save_weights

    constant = tmp_path / "constant"
    shutil.copytree(setup["model"], constant)
    model, _ = load_hf_model(constant)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0 again and again
    save_weights(model, constant)
    prompts = [("def add(a, b):\n", {"until": ["never"], "max_gen_toks": 24})] * 2
    for path, degenerate in ((setup["model"], False), (constant, True)):
        lm = TiDARLM(pretrained=str(path), block_size=3, device="cpu", batch_size=2)
        lm.generate_until(requests("generate_until", prompts))
        caplog.clear()
        with caplog.at_level("WARNING"):
            stats = lm.get_model_info()["tidar_decoding"]
        assert stats["repetition"]["degenerate"] is degenerate, stats
        assert (stats["note"] is not None) is degenerate and ("degenerate output" in caplog.text) is degenerate
    assert stats["tokens_per_pass"] > 2.0 and stats["repetition"]["loop_fraction"] == 23 / 24
    assert stats["note"].startswith(f"tidar decoding's {stats['tokens_per_pass']:.2f} tokens per pass come from "
                                    "degenerate output")


class LMEvalCommand:
    """`tidar-megatron lm-eval` as docs/evaluation.md writes it, started in a fresh process (two at a time: most
    of each is lm-eval indexing its own task YAMLs, on one core)."""

    def __init__(self, setup, out, *args):
        self.out = out
        command = [sys.executable, "-m", "tidar_megatron", "lm-eval", "--model", "tidar", "--include_path",
                   setup["tasks"], "--output_path", str(out), "--log_samples", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **OFFLINE})

    def result(self):
        _, log = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, textwrap.shorten(log[-3000:], 3000)
        results = json.loads(next(self.out.rglob("results_*.json")).read_text())
        samples = {re.match(r"samples_(.+)_\d{4}-", f.name)[1]: [json.loads(line)["resps"] for line in
                                                                  f.read_text().splitlines()]
                   for f in self.out.rglob("samples_*.jsonl")}
        return results, samples, log


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the commands on a machine without a GPU")
def test_documented_command_lines_run_on_a_cpu(setup, tmp_path):
    """lm-eval hands the model device="cuda:0" when --device is not given; with device= in --model_args its
    own models stop with "got multiple values for keyword argument 'device'".  Every combination runs here;
    tasks with different generation settings, pooled, answer alike at batch 2 and at batch 1; --use_cache
    answers a rerun from its cache."""
    model, cache = f"pretrained={setup['model']}", str(tmp_path / "cache" / "tidar")
    tasks = ["--tasks", "tiny_gen", "tiny_short"]
    plain = LMEvalCommand(setup, tmp_path / "a", "--model_args", model, *tasks, "--batch_size", "2",
                          "--use_cache", cache)
    in_model_args = LMEvalCommand(setup, tmp_path / "b", "--model_args", f"{model},device=cpu", *tasks)
    first, samples, log = plain.result()
    assert "device cuda:0 is not available here: using cpu" in log
    assert set(first["results"]) == {"tiny_gen", "tiny_short"} and first["config"]["tidar_decoding"]["new_tokens"] > 0
    second, again, _ = in_model_args.result()
    assert again == samples and second["config"]["tidar_decoding"] == first["config"]["tidar_decoding"]
    cached = LMEvalCommand(setup, tmp_path / "c", "--model_args", model, *tasks, "--device", "cpu", "--use_cache", cache)
    both = LMEvalCommand(setup, tmp_path / "d", "--model_args", f"{model},device=cpu", "--device", "cpu", "--tasks",
                         "tiny_short", "--limit", "1")
    _, from_cache, log = cached.result()
    assert from_cache == samples and "Cached requests: 8, Requests remaining: 0" in log
    _, first_only, _ = both.result()
    assert first_only == {"tiny_short": samples["tiny_short"][:1]}
