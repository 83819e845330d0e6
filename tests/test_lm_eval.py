"""The `tidar` model type for lm-evaluation-harness, offline on local task YAMLs written here.

On one exported-style directory (a tiny Llama with our SentencePiece tokenizer.model): the `tidar` model's
log-likelihoods equal lm-eval's own `hf` model's (a second implementation: transformers' modeling code)
on a multiple-choice and a rolling-loglikelihood task; generate_until gives the same answers in tidar and
ar mode under greedy decoding; a code task is scored by the project's sandboxed pass@1; and
`tidar-megatron lm-eval` runs lm-eval's command line with the tokens-per-pass record in the results.
"""

import json
import subprocess
import sys
import textwrap

import pytest
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
        (tasks / f"tiny_{name}.yaml").write_text(f"task: tiny_{name}\n" + common.format(path=tasks / f"{name}.jsonl")
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
    runs = {"hf": ("hf", "", ["tiny_mc", "tiny_rolling"]),
            "tidar": ("tidar", "mode=tidar,block_size=3", ["tiny_mc", "tiny_rolling", "tiny_gen", "tiny_code"]),
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
    assert out["tidar"]["samples"]["tiny_gen"] == out["ar"]["samples"]["tiny_gen"]  # greedy: lossless
    assert out["tidar"]["results"]["tiny_code"]["pass@1,none"] == 0.5  # the sandbox ran both tests
    decoding = out["tidar"]["config"]["tidar_decoding"]
    assert decoding["mode"] == "tidar" and decoding["block_size"] == 3 and decoding["tokens_per_pass"] >= 1.0
    assert sum(decoding["acceptance_histogram"]) > 0
    assert out["ar"]["config"]["tidar_decoding"]["tokens_per_pass"] == 1.0


@pytest.mark.slow
def test_lm_eval_command_line(setup, tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "tidar_megatron", "lm-eval", "--model", "tidar", "--model_args",
                           f"pretrained={setup['model']},mode=tidar", "--tasks", "tiny_gen", "--include_path",
                           setup["tasks"], "--device", "cpu", "--output_path", str(out)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ, **OFFLINE})
    assert proc.returncode == 0, textwrap.shorten(proc.stderr[-3000:], 3000)
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert "tiny_gen" in written["results"] and written["config"]["tidar_decoding"]["mode"] == "tidar"
