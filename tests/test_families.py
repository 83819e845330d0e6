"""Every supported family from its published config.json layout (tests/hf_families.py), against transformers:
import -> logits, export -> a directory transformers reads as the source, `evaluate` on the export -> the
source's likelihood, the vocabulary the import decides -> what the training run resolves, and the README's
recipe command and the Slurm INIT_FROM route, as written, training from an import.

One spawned single-rank process imports every family with import-hf's defaults (the paper's recipe for its
size), computes the import's logits as training builds the model (its config.yaml, then init_from) and
exports the untouched import; the rest runs in this process or as the documented command lines.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gather import rel_err
from hf_families import FAMILIES, VOCAB, make_checkpoint, reference_logits
from multirank import run_on_ranks

from tidar_megatron.net import free_port

REPO = Path(__file__).resolve().parent.parent
L = 16
# config.json keys an export may change: the TiDAR fields, the grown vocabulary, the writer's version.
IGNORED = {"tidar_mask_token_id", "tidar_draft_block_size", "vocab_size", "transformers_version", "_name_or_path"}
# The two families the documented command lines train from: no spare vocabulary slot (a new mask row) with
# llama3 RoPE through the README command, and a spare slot with biases through the Slurm launcher.
RECIPE, SLURM = "llama3.2", "qwen2.5"


def _tokens():
    return torch.randint(3, 100, (2, L), generator=torch.Generator().manual_seed(0))


# --- Megatron side (one spawned rank) ------------------------------------------------------------------
def _logits(model, cfg, tokens):
    """[b, L, padded V] logits of the clean half of the TiDAR sequence (one rank)."""
    from tidar_megatron.layout import TiDARLayout

    layout = TiDARLayout.for_training(L, cfg.tidar.draft_block_size)
    model.eval()
    with torch.no_grad():
        return model(layout.training_inputs(tokens, cfg.tidar.mask_token_id), layout.position_ids,
                     layout=layout)[:, :L]


def _convert_all(rank, world_size, hf_dirs, out, tokens):
    from tidar_megatron import convert
    from tidar_megatron.config import Config, load_config
    from tidar_megatron.model import build_model
    from tidar_megatron.training import distributed
    from tidar_megatron.training.checkpoint import CheckpointError, load_model_weights

    distributed.initialize(Config())
    out, result = Path(out), {"logits": {}}
    for name, hf_dir in hf_dirs.items():
        convert.import_hf_local(hf_dir, out / name, preset="auto")
        # As training builds it (fp32 here, to compare with transformers at 1e-5).
        cfg = load_config(str(out / name / "config.yaml"), ["--train.bf16", "false"])
        chunks = build_model(cfg, on_gpu=False)
        load_model_weights(chunks, out / name)
        result["logits"][name] = _logits(chunks[0], cfg, tokens)
        convert.export_local(out / name, out / f"{name}-hf")
    # init_from into a model of another vocabulary (an existing mask id: one row fewer) is refused.
    cfg = load_config(str(out / "llama2" / "config.yaml"), ["--tidar.mask_token_id", "5"])
    try:
        load_model_weights(build_model(cfg, on_gpu=False), out / "llama2")
        result["init_from_error"] = None
    except CheckpointError as e:
        result["init_from_error"] = str(e)
    return result


# --- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """name -> (source directory, transformers' fp32 logits on the test tokens)."""
    root = tmp_path_factory.mktemp("hf")
    return {name: (d, reference_logits(d, _tokens())) for name in FAMILIES
            for d in [make_checkpoint(root / name, name, seed=len(name))]}


@pytest.fixture(scope="module")
def converted(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    result = run_on_ranks(1, _convert_all, {n: str(d) for n, (d, _) in sources.items()}, str(out), _tokens())[0]
    return out, result


def _mask_token_id(converted, name):
    return json.loads((converted[0] / f"{name}-hf" / "config.json").read_text())["tidar_mask_token_id"]


def _close(got, want, what, mask_token_id):
    """got [..., >= VOCAB] and want [..., VOCAB] agree to 1e-5 on every id but the mask token's, whose row
    the import initialised (a new row, or a spare one that no token uses)."""
    keep = [i for i in range(VOCAB) if i != mask_token_id]
    err = rel_err(got[..., keep], want[..., keep])
    assert err <= 1e-5, f"{what}: rel error {err:.2e}"


# --- tests ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_import_logits_equal_transformers(name, sources, converted):
    source, reference = sources[name]
    _close(converted[1]["logits"][name], reference, f"{name} import", _mask_token_id(converted, name))
    raw = json.loads((source / "config.json").read_text())
    if raw.get("rope_scaling") or raw.get("rope_parameters", {}).get("rope_type", "default") != "default":
        # The scaling changes these logits: a conversion that dropped it would fail above.
        plain = dict(raw, rope_scaling=None, rope_parameters=None)
        (source.parent / f"{name}-plain").mkdir(exist_ok=True)
        (source.parent / f"{name}-plain" / "config.json").write_text(json.dumps(plain))
        os.symlink(source / "model.safetensors", source.parent / f"{name}-plain" / "model.safetensors")
        assert rel_err(reference_logits(source.parent / f"{name}-plain", _tokens()), reference) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_of_an_import_reads_as_its_source(name, sources, converted):
    """transformers reads the export to the source's config (but for the TiDAR fields and the grown
    vocabulary), in the source's dtype, with its generation config and tokenizer, the same weights and the
    same logits."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source, reference = sources[name]
    export = converted[0] / f"{name}-hf"
    got, want = AutoConfig.from_pretrained(export).to_dict(), AutoConfig.from_pretrained(source).to_dict()
    assert {k: v for k, v in got.items() if k not in IGNORED} == {k: v for k, v in want.items() if k not in IGNORED}
    assert got["dtype"] == "bfloat16" and got["max_position_embeddings"] == want["max_position_embeddings"]
    mask = _mask_token_id(converted, name)
    assert got["vocab_size"] == VOCAB + (mask == VOCAB)
    if (source / "generation_config.json").is_file():
        assert json.loads((export / "generation_config.json").read_text()) == \
            json.loads((source / "generation_config.json").read_text())
    original, exported = (load_file(str(d / "model.safetensors")) for d in (source, export))
    assert original.keys() == exported.keys()
    for key, want_tensor in original.items():  # bitwise, but for the mask token's row
        got_tensor = exported[key][:VOCAB]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            keep = [i for i in range(VOCAB) if i != mask]
            got_tensor, want_tensor = got_tensor[keep], want_tensor[keep]
        assert got_tensor.dtype == torch.bfloat16 and torch.equal(got_tensor, want_tensor), key
    tokenizer, original = AutoTokenizer.from_pretrained(export), AutoTokenizer.from_pretrained(source)
    assert tokenizer.get_vocab() == original.get_vocab() and tokenizer.chat_template == original.chat_template
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    with torch.no_grad():
        _close(model(_tokens()).logits, reference, f"{name} export", mask)


def _write_documents(prefix, documents, vocab):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab))
    for doc in documents:
        builder.add_document(np.asarray(doc), [len(doc)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_evaluate_on_the_export_equals_transformers_likelihood(name, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    from tidar_megatron.evaluation.evaluate import main as evaluate

    g = torch.Generator().manual_seed(1)
    documents = [torch.randint(3, 100, (n,), generator=g).tolist() for n in (30, 9, 17)]
    prefix = _write_documents(tmp_path / "docs", documents, VOCAB + 1)
    export = converted[0] / f"{name}-hf"
    out = tmp_path / "results.json"
    assert evaluate(["--model", str(export), "--data", prefix, "--seq-length", str(L), "--output", str(out),
                     "--quiet"]) == 0
    reference = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    nll = count = 0
    with torch.no_grad():
        for doc in documents:
            for start in range(0, len(doc), L):
                window = torch.tensor([doc[start:start + L]])
                if window.shape[1] > 1:
                    nll += reference(window, labels=window).loss.item() * (window.shape[1] - 1)
                    count += window.shape[1] - 1
    assert json.loads(out.read_text())["likelihood"]["ar_nll"] == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_import_the_tokenizer_and_training_agree_on_the_vocabulary(name, sources, converted):
    """config.yaml's vocabulary and mask token pass the training run's check against the tokenizer as they
    are (no extra flags), and the checkpoint has exactly the rows they give."""
    from megatron.core import dist_checkpointing

    from tidar_megatron.config import load_config, resolve_vocabulary
    from tidar_megatron.data.tokenizer import Tokenizer

    source = sources[name][0]
    ckpt = converted[0] / name
    cfg = load_config(str(ckpt / "config.yaml"), ["--data.tokenizer", str(source)])
    tokenizer = Tokenizer(str(source))
    resolve_vocabulary(cfg, tokenizer.text_vocab_size, tokenizer.mask_id, "the tokenizer")
    assert cfg.model.vocab_size == VOCAB and cfg.tidar.mask_token_id == tokenizer.mask_id
    assert cfg.data.tokenizer == str(source.resolve())
    spare = tokenizer.text_vocab_size < VOCAB  # Qwen: the mask token takes the first unused row
    assert cfg.tidar.mask_token_id == (tokenizer.text_vocab_size if spare else VOCAB)
    saved = dist_checkpointing.load_tensors_metadata(str(ckpt / "iter_0000000"))
    assert saved["embedding.word_embeddings.weight"].global_shape[0] == cfg.padded_vocab_size


@pytest.mark.slow
def test_init_from_refuses_a_checkpoint_of_another_shape(converted):
    error = converted[1]["init_from_error"]
    assert error and "\n" not in error and "embedding.word_embeddings.weight has shape (256, 64)" in error
    assert "gives (128, 64)" in error and "import-hf's config.yaml" in error


def _data(source, tmp_path) -> str:
    """Documents of the source tokenizer's ids, each ended by its end-of-document token (what `tidar-megatron
    tokenize` writes; the test tokenizers' text side is not what is tested here)."""
    from tidar_megatron.data.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(source))
    g = torch.Generator().manual_seed(2)
    documents = [torch.randint(3, tokenizer.text_vocab_size, (n,), generator=g).tolist() + [tokenizer.eod_id]
                 for n in torch.randint(20, 60, (300,), generator=g).tolist()]
    return _write_documents(tmp_path / "data", documents, tokenizer.vocab_size)


# The run's size and where it goes: the only overrides the recipe needs on a CPU in a test.
SIZE = ["--train.train_steps", "2", "--train.seq_length", str(L), "--train.global_batch_size", "2",
        "--train.micro_batch_size", "1", "--log.wandb_mode", "disabled"]


@pytest.mark.slow
def test_the_readme_recipe_trains_from_an_import_and_exports_like_the_source(sources, tmp_path, capfd):
    """The README's recipe, as written: `import-hf --hf <dir> --output <init>`, `train --config
    <init>/config.yaml --data.blend ... --data.tokenizer <dir>` (bf16, the fused loss, document-level
    attention, on the CPU, with no vocabulary or backend flags), `export --checkpoint <run> --output <hf>
    --tokenizer <dir>`: the export says what it wrote and loads in transformers with the source's context
    length and dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tidar_megatron import convert

    source = sources[RECIPE][0]
    init, run, hf = tmp_path / "init", tmp_path / "run", tmp_path / "hf"
    assert convert.import_hf_main(["--hf", str(source), "--output", str(init)]) == 0
    assert f"mask token {VOCAB}: a new row after the {VOCAB}-row vocabulary" in capfd.readouterr().err
    proc = subprocess.run([sys.prefix + "/bin/tidar-megatron", "train", "--config", str(init / "config.yaml"),
                           "--data.blend", _data(source, tmp_path), "--data.tokenizer", str(source),
                           "--checkpoint.dir", str(run), *SIZE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "iter_0000002" / "metadata.json").is_file() and "step 2/2" in (run / "train.log").read_text()

    assert convert.export_main(["--checkpoint", str(run), "--output", str(hf), "--tokenizer", str(source)]) == 0
    printed = capfd.readouterr().out
    assert f"llama, vocabulary {VOCAB + 1} rows, mask token {VOCAB} (the last row), context 131072" in printed
    assert "bfloat16 weights" in printed and "tokenizer.json" in printed and "generation_config.json" in printed
    config = AutoConfig.from_pretrained(hf)
    assert (config.max_position_embeddings, config.dtype, config.rope_parameters["rope_type"]) == \
        (131072, torch.bfloat16, "llama3")
    assert AutoModelForCausalLM.from_pretrained(hf).dtype == torch.bfloat16
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [hf, *hf.iterdir()]}
    assert modes == {name: (0o777 if name == "hf" else 0o666) & ~umask for name in modes}, modes


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if n != RECIPE])
def test_every_family_trains_from_its_import_through_the_readme_command(name, sources, converted, tmp_path):
    """`train --config <import>/config.yaml --data.blend ... --data.tokenizer <dir>` with only data, size and
    output overrides, for the families the test above does not run (their import is import-hf's, done once
    by the fixture): two steps, a checkpoint."""
    source, run = sources[name][0], tmp_path / "run"
    proc = subprocess.run([sys.prefix + "/bin/tidar-megatron", "train", "--config",
                           str(converted[0] / name / "config.yaml"), "--data.blend", _data(source, tmp_path),
                           "--data.tokenizer", str(source), "--checkpoint.dir", str(run), *SIZE],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "iter_0000002" / "metadata.json").is_file() and "step 2/2" in (run / "train.log").read_text()


@pytest.mark.slow
def test_the_slurm_init_from_route_trains_from_an_import(sources, converted, tmp_path):
    """`INIT_FROM=<import> sbatch slurm/pretrain_1p5b.sh --data.blend ... --data.tokenizer <dir>`, with srun
    replaced by a stub that runs the task once in place."""
    source = sources[SLURM][0]
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "srun").write_text('#!/usr/bin/env bash\n[ "$1" = --kill-on-bad-exit=1 ] && shift\nexec "$@"\n')
    (stub / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "TIDAR_HOME": str(REPO), "VENV": sys.prefix,
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
           "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
           "INIT_FROM": str(converted[0] / SLURM), "CKPT_DIR": str(tmp_path / "run")}
    proc = subprocess.run(["bash", str(REPO / "slurm" / "pretrain_1p5b.sh"), "--data.blend",
                           _data(source, tmp_path), "--data.tokenizer", str(source), *SIZE], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "run" / "iter_0000002" / "metadata.json").is_file()
