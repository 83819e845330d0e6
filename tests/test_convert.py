"""HF <-> Megatron conversion against transformers, the independent reference.

Megatron runs only in spawned processes, grouped so the whole file needs four of them:
  * one rank:  import three tiny random transformers models (Qwen2 with biases and tied embeddings, Qwen3
    with QK-norm and head_dim != hidden/heads, Llama) for TP=2/PP=2;
  * four ranks (TP=2, PP=2): logits of those imports (written by that one process, so this is
    dist_checkpointing's resharding at work); a few training steps of a tiny model, saved;
  * `tidar-megatron export` of that checkpoint (the public path, its own process);
  * one rank: re-import of the export, the error cases.
Logits are compared on the clean (causal) half of the TiDAR sequence, fp32, rel <= 1e-5.  Every family at
TP=1, and exports of imports, are in test_families.py.
"""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from gather import rel_err
from multirank import run_on_ranks

VOCAB, L, B, BATCH = 100, 8, 4, 2
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-5)
ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(rope_theta=5e5, tie_word_embeddings=False)),
}
TRAIN = ["--model.vocab_size", str(VOCAB), "--model.add_qkv_bias", "true", "--model.tie_embeddings", "true",
         "--train.seq_length", str(L), "--tidar.draft_block_size", str(B), "--train.global_batch_size", "4",
         "--train.micro_batch_size", "2", "--train.lr_warmup_steps", "0", "--train.lr", "1e-2",
         "--parallel.tensor_parallel", "2", "--parallel.pipeline_parallel", "2"]


def _tokens(seed=0):
    return torch.randint(0, VOCAB, (BATCH, L), generator=torch.Generator().manual_seed(seed))


# --- Megatron side (runs in spawned ranks) ----------------------------------------------------------
def _logits(model, cfg, tokens):
    """Full-vocabulary logits [b, L, padded V] of the clean half on the last pipeline stage, else None."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from tidar_megatron.layout import TiDARLayout

    layout = TiDARLayout.for_training(L, cfg.tidar.draft_block_size)
    ids, pos = layout.training_inputs(tokens, cfg.tidar.mask_token_id), layout.position_ids
    model.eval()
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            hidden = torch.empty(layout.seq_len, tokens.shape[0], cfg.model.hidden_size)
            torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(hidden)
        out = model(ids, pos, layout=layout)
        if not ps.is_pipeline_last_stage():
            torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        return gather_from_tensor_model_parallel_region(out)[:, :L]


def _load(ckpt):
    """The model of an imported checkpoint, as training would build it: its config.yaml, then --init.from."""
    from tidar_megatron.config import load_config
    from tidar_megatron.model import build_model
    from tidar_megatron.training.checkpoint import load_model_weights

    cfg = load_config(str(Path(ckpt) / "config.yaml"))
    chunks = build_model(cfg, on_gpu=False)
    load_model_weights(chunks, ckpt)
    return chunks[0], cfg


def _import_all(rank, world_size, hf_dirs, out):
    from tidar_megatron import convert
    from tidar_megatron.config import Config
    from tidar_megatron.training import distributed

    distributed.initialize(Config())
    for arch, hf_dir in hf_dirs.items():
        convert.import_hf_local(hf_dir, Path(out) / f"{arch}-tp2pp2", 2, 2)


def _parallel(rank, world_size, ckpts, tokens, train_dir):
    from tidar_megatron.config import load_config
    from tidar_megatron.data.batch import from_token_windows
    from tidar_megatron.layout import TiDARLayout
    from tidar_megatron.training import checkpoint, distributed
    from tidar_megatron.training.trainer import build_trainer

    cfg = load_config("tiny", TRAIN)
    distributed.initialize(cfg)
    imported = {}
    for arch, ckpt in ckpts.items():
        model, arch_cfg = _load(ckpt)
        assert (arch_cfg.parallel.tensor_parallel, arch_cfg.parallel.pipeline_parallel) == (2, 2)
        imported[arch] = _logits(model, arch_cfg, tokens)
    trainer = build_trainer(cfg, on_gpu=False)
    windows = torch.randint(0, VOCAB, (3, 4, L + 1), generator=torch.Generator().manual_seed(1))
    layout = TiDARLayout.for_training(L, B)
    for step in windows:
        trainer.train_step([from_token_windows(layout, step[i:i + 2], cfg.tidar.mask_token_id) for i in (0, 2)])
    checkpoint.save(trainer, train_dir, {"consumed_samples": 12})
    return {"imported": imported, "trained": _logits(trainer.model[0].module, cfg, tokens)}


def _roundtrip(rank, world_size, export_dir, train_dir, out):
    from megatron.core import dist_checkpointing

    from tidar_megatron import convert
    from tidar_megatron.config import Config, from_dict, load_config
    from tidar_megatron.training import distributed
    from tidar_megatron.training.checkpoint import load_model_weights

    distributed.initialize(Config())
    out = Path(out)
    result = {"errors": {}}

    # Re-import the export at the trained layout; compare every parameter with the trained checkpoint's.  Its
    # weights and config only: the tokenizer it was exported with is larger than this toy's vocabulary.
    (out / "export").mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / "export" / name).symlink_to(Path(export_dir) / name)
    reimported = convert.import_hf_local(out / "export", out / "reimport", 2, 2)
    params = []
    for ckpt in (train_dir, reimported):
        path = convert.resolve_checkpoint(Path(ckpt))
        cfg = from_dict(dist_checkpointing.load_common_state_dict(str(path))["config"])
        model = convert.single_rank_model(cfg)
        load_model_weights([model], path)
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    result["reimport"] = params

    # A checkpoint whose saved config does not match its tensors.
    good = load_config("tiny", ["--model.vocab_size", str(VOCAB)])
    model = convert.single_rank_model(good)
    bad = load_config("tiny", ["--model.vocab_size", str(VOCAB), "--model.ffn_hidden_size", "128"])
    (out / "bad" / "iter_0000000").mkdir(parents=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "config": bad.to_dict()},
                            str(out / "bad" / "iter_0000000"))
    (out / "bad" / "latest").write_text("iter_0000000\n")
    # And a Hugging Face directory whose config.json promises more layers than it has weights for.
    broken = out / "broken-hf"
    broken.mkdir()
    hf_config = json.loads((Path(export_dir) / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(hf_config, num_hidden_layers=4)))
    (broken / "model.safetensors").symlink_to(Path(export_dir) / "model.safetensors")
    for name, call in (("export", lambda: convert.export_local(out / "bad", out / "bad-hf")),
                       ("import", lambda: convert.import_hf_local(broken, out / "broken-ckpt"))):
        try:
            call()
            result["errors"][name] = None
        except convert.ConvertError as e:
            result["errors"][name] = str(e)
    result["left_behind"] = sorted(p.name for p in out.iterdir())
    return result


# --- pytest side ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """Tiny random transformers models saved to disk, with their logits on the test tokens."""
    import transformers

    root = tmp_path_factory.mktemp("hf")
    tokens, models = _tokens(), {}
    for arch, (config_cls, model_cls, extra) in ARCHS.items():
        torch.manual_seed(len(models))
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**SMALL, **extra)).eval()
        with torch.no_grad():  # norms and biases away from their 1 / 0 init, so a swap would show
            for name, p in model.named_parameters():
                p.add_(0.1 * torch.randn_like(p)) if "norm" in name or "bias" in name else p.normal_(0, 0.1)
            logits = model(tokens).logits
        model.save_pretrained(root / arch)
        models[arch] = (root / arch, logits)
    return models


@pytest.fixture(scope="module")
def imported(hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported")
    dirs = {arch: str(d) for arch, (d, _) in hf_models.items()}
    run_on_ranks(1, _import_all, dirs, str(out))
    return out


@pytest.fixture(scope="module")
def parallel(imported, tmp_path_factory):
    out = imported
    ckpts = {arch: str(out / f"{arch}-tp2pp2") for arch in ARCHS}
    train_dir = tmp_path_factory.mktemp("trained") / "checkpoints"
    results = run_on_ranks(4, _parallel, ckpts, _tokens(), str(train_dir))
    last = [r for r in results if r["trained"] is not None]
    assert len(last) == 2  # the two TP ranks of the last stage
    return train_dir, last[0]


@pytest.fixture(scope="module")
def exported(parallel, tmp_path_factory):
    from tidar_megatron import convert
    from tidar_megatron.data.tokenizer import train_sentencepiece

    train_dir, _ = parallel
    root = tmp_path_factory.mktemp("export")
    tokenizer = train_sentencepiece([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)],
                                    str(root / "code.model"), vocab_size=320)
    assert convert.export_main(["--checkpoint", str(train_dir), "--output", str(root / "hf"),
                                "--tokenizer", tokenizer]) == 0
    return root / "hf", tokenizer


@pytest.fixture(scope="module")
def roundtrip(parallel, exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("roundtrip")
    return run_on_ranks(1, _roundtrip, str(exported[0]), str(parallel[0]), str(out))[0]


def _close(got, want, what):
    err = rel_err(got, want)
    assert err <= 1e-5, f"{what}: rel error {err:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_matches_transformers_at_tp2_pp2(arch, hf_models, parallel):
    _close(parallel[1]["imported"][arch][..., :VOCAB], hf_models[arch][1], f"{arch} TP=2/PP=2")


@pytest.mark.slow
def test_export_of_trained_tp2_pp2_checkpoint_loads_in_transformers(parallel, exported):
    import sentencepiece as spm
    from transformers import AutoModelForCausalLM

    hf_dir, tokenizer = exported
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"]
    tidar = (config["vocab_size"], config["tidar_mask_token_id"], config["tidar_draft_block_size"])
    assert tidar == (VOCAB + 1, VOCAB, B)
    eos = spm.SentencePieceProcessor(model_file=tokenizer).eos_id()
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == eos
    assert (hf_dir / "tokenizer.model").read_bytes() == Path(tokenizer).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(_tokens()).logits
    _close(logits, parallel[1]["trained"][..., :VOCAB + 1], "exported vs Megatron logits")


@pytest.mark.slow
def test_reimported_export_has_identical_weights(roundtrip):
    trained, reimported = roundtrip["reimport"]
    assert trained.keys() == reimported.keys()
    for name, t in trained.items():
        if "word_embeddings" in name or "output_layer" in name:  # padding rows are not exported
            t, r = t[:VOCAB + 1], reimported[name][:VOCAB + 1]
        else:
            r = reimported[name]
        assert torch.equal(t, r), name


@pytest.mark.slow
def test_config_weight_mismatches_are_one_line_errors(roundtrip):
    errors = roundtrip["errors"]
    assert errors["export"] and "\n" not in errors["export"] and "config does not match" in errors["export"]
    assert "linear_fc2.weight has shape (2, 64, 192) but the saved config gives (2, 64, 128)" in errors["export"]
    assert errors["import"] and "\n" not in errors["import"] and "model.layers.2." in errors["import"]
    assert not any(name.startswith(".tmp") for name in roundtrip["left_behind"])
    assert "bad-hf" not in roundtrip["left_behind"] and "broken-ckpt" not in roundtrip["left_behind"]


def test_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    from tidar_megatron import convert

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    assert convert.export_main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists" in err and "--force" in err and "\n" not in err
    assert (tmp_path / "hf" / "config.json").read_text() == "{}"


def test_mapping_round_trip_without_megatron():
    """hf_to_megatron then megatron_to_hf gives back every tensor (pure tensors, no model)."""
    from tidar_megatron.convert.mapping import choose_mask_token, config_from_hf, hf_to_megatron, megatron_to_hf
    from tidar_megatron.hf.config import parse_hf_config

    hf = dict(SMALL, model_type="qwen3", head_dim=24, num_key_value_heads=2)
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, 64), "lm_head.weight": (VOCAB, 64), "model.norm.weight": (64,)}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (64,), p + "post_attention_layernorm.weight": (64,),
                       p + "self_attn.q_proj.weight": (96, 64), p + "self_attn.k_proj.weight": (48, 64),
                       p + "self_attn.v_proj.weight": (48, 64), p + "self_attn.o_proj.weight": (64, 96),
                       p + "self_attn.q_norm.weight": (24,), p + "self_attn.k_norm.weight": (24,),
                       p + "mlp.gate_proj.weight": (96, 64), p + "mlp.up_proj.weight": (96, 64),
                       p + "mlp.down_proj.weight": (64, 96)})
    weights = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    cfg = config_from_hf(hf, set(weights))
    assert cfg.model.qk_layernorm and not cfg.model.add_qkv_bias and cfg.model.kv_channels == 24
    assert cfg.tidar.mask_token_id == VOCAB and cfg.padded_vocab_size == 128
    mg = hf_to_megatron(cfg, weights)
    assert mg["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (96 + 48 + 48, 64)
    # Query group 0 = [its two q heads; its k head; its v head].
    q, k, v = (weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    torch.testing.assert_close(mg["decoder.layers.0.self_attention.linear_qkv.weight"][:96],
                               torch.cat([q[:48], k[:24], v[:24]]))
    back = megatron_to_hf(cfg, mg)
    assert back.keys() == weights.keys()
    for name, t in weights.items():
        assert torch.equal(back[name][:VOCAB] if "embed" in name or "lm_head" in name else back[name], t), name
    # With a preset: the architecture from config.json, the training settings from the preset.
    from tidar_megatron.config import load_config

    tiny = config_from_hf(hf, set(weights), base=load_config("tiny"))
    assert tiny.model == dataclasses.replace(cfg.model, make_vocab_size_divisible_by=64, attention_backend="local")
    assert (tiny.tidar.draft_block_size, tiny.train.seq_length, tiny.padded_vocab_size) == (8, 64, 128)
    # An existing token as the mask token: the vocabulary is not extended, and an export keeps VOCAB rows.
    parsed = parse_hf_config(hf, set(weights))
    existing = config_from_hf(parsed, set(weights), mask=choose_mask_token(parsed, requested=5))
    assert (existing.model.vocab_size, existing.tidar.mask_token_id) == (VOCAB, 5)
    assert megatron_to_hf(existing, hf_to_megatron(existing, weights))["lm_head.weight"].shape == (VOCAB, 64)
    # Re-importing exports: a new mask token is the last row; an existing one is an ordinary token.
    for mask, rows, vocab in ((VOCAB, VOCAB + 1, VOCAB), (5, VOCAB, VOCAB)):
        again = config_from_hf(dict(hf, vocab_size=rows, tidar_mask_token_id=mask), set(weights))
        assert (again.model.vocab_size, again.tidar.mask_token_id) == (vocab, mask)


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


@pytest.mark.parametrize("change, message", [
    (dict(model_type="smollm3"), "model_type 'smollm3' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), r"rope_scaling.type 'dynamic' is not supported: "
     "megatron-core has no dynamic NTK scaling"),
    (dict(rope_parameters={"rope_type": "longrope", "long_factor": [1.0]}), "rope_parameters.rope_type 'longrope'"),
    (dict(rope_scaling=dict(LLAMA3, low_freq_factor=2.0)), r"rope_scaling.low_freq_factor 2.0: megatron-core's "
     "llama3 scaling fixes it at 1.0"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                        "attention_factor": 1.5}), r"rope_scaling.attention_factor 1.5: megatron-core derives it"),
    (dict(rope_scaling={"type": "linear"}), "rope_scaling.factor None: the linear scaling needs a positive factor"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor 0.5"),
    (dict(model_type="mistral"), r"sliding_window=4096 \(the default when absent\)"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_unsupported_hf_configs_are_one_line_errors(change, message):
    """What megatron-core cannot train is refused naming the config.json field, and only that: the same
    reader serves the decoder, which reads llama3 scaling with other factors."""
    from tidar_megatron.convert.mapping import ConvertError, config_from_hf

    with pytest.raises(ConvertError, match=message) as error:
        config_from_hf({**SMALL, "model_type": "llama", **change}, set(), source="x/config.json")
    assert str(error.value).startswith("x/config.json: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["untied", "tied", "tied-with-a-stored-head"])
def test_tied_embeddings_are_read_from_config_json_by_both_readers(tmp_path, case):
    """One config.json reader (tidar_megatron/hf/config.py) decides tied embeddings for conversion and for the
    decoder alike, as transformers 5 does: `tie_word_embeddings`, except that a stored lm_head with values
    of its own (here noise) is kept untied.  Both are checked against transformers' logits."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from tidar_megatron.convert.mapping import config_from_hf, hf_to_megatron
    from tidar_megatron.hf.config import read_hf_config
    from tidar_megatron.hf.weights import load_weights
    from tidar_megatron.inference.hf_checkpoint import load_hf_model
    from tidar_megatron.testing import tiny_hf_checkpoint

    tiny_hf_checkpoint(tmp_path, "qwen2", tie_word_embeddings=case != "untied")
    tied = case == "tied"
    if case == "tied-with-a-stored-head":
        weights = load_file(str(tmp_path / "model.safetensors"))
        weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])
        save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    weights = load_weights(tmp_path)
    assert read_hf_config(tmp_path, weights).tie_word_embeddings is tied
    cfg = config_from_hf(json.loads((tmp_path / "config.json").read_text()), weights)
    assert cfg.model.tie_embeddings is tied
    assert ("output_layer.weight" in hf_to_megatron(cfg, weights)) is not tied
    ours, _ = load_hf_model(tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    tokens = torch.arange(3, 15)[None]
    with torch.no_grad():
        got = ours(tokens, torch.arange(12)[None], torch.ones(1, 12, 12, dtype=torch.bool).tril())
        torch.testing.assert_close(got, reference(tokens).logits, rtol=1e-5, atol=1e-5)
