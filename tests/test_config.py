"""Typed configs: presets, dotted overrides, and validation messages that name the field."""

import pytest
import yaml

from tidar_megatron.config import ConfigError, load_config, parse_overrides


def test_presets_have_the_documented_shapes():
    q15 = load_config("1p5b")
    m = q15.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups, m.ffn_hidden_size) == \
        (28, 1536, 12, 2, 8960)
    assert m.add_qkv_bias and m.tie_embeddings and m.norm_epsilon == 1e-6 and m.rope_base == 1e6
    assert q15.tidar.mask_token_id == 151936 and q15.padded_vocab_size >= 151937
    q8 = load_config("8b").model
    assert (q8.num_layers, q8.hidden_size, q8.num_attention_heads, q8.num_query_groups, q8.head_dim,
            q8.ffn_hidden_size) == (36, 4096, 32, 8, 128, 12288)
    assert q8.qk_layernorm and not q8.add_qkv_bias and not q8.tie_embeddings
    tiny = load_config("tiny")
    assert tiny.tidar.alpha == 1.0 and tiny.model.num_layers == 2


def test_dotted_overrides_are_typed():
    cfg = load_config("tiny", ["--model.num_layers", "4", "--train.lr=1e-3", "--parallel.sequence_parallel",
                               "false", "--data.blend", "a", "--init.from", "ckpt"])
    assert cfg.model.num_layers == 4 and cfg.train.lr == 1e-3 and cfg.parallel.sequence_parallel is False
    assert cfg.data.blend == ["a"] and cfg.checkpoint.init_from == "ckpt"
    assert parse_overrides(["--a.b", "[1, 2]"]) == [("a.b", [1, 2])]


@pytest.mark.parametrize("overrides,message", [
    (["--model.attention_backend", "fast"], "model.attention_backend must be one of auto, local, flex, te, kernel"),
    (["--model.num_layers", "two"], "model.num_layers must be int"),
    (["--model.num_layerz", "2"], "unknown field(s) model.num_layerz"),
    (["--modle.num_layers", "2"], "unknown section(s) ['modle']"),
    (["--tidar.draft_block_size", "0"], "tidar.draft_block_size must be >= 1"),
    (["--model.num_query_groups", "3"], "must be a multiple of model.num_query_groups"),
    (["--model.vocab_size", "256", "--tidar.mask_token_id", "100000"], "tidar.mask_token_id (100000)"),
    (["--parallel.context_parallel", "2"], "context_parallel > 1 is not supported"),
    (["--parallel.virtual_pipeline", "2"], "parallel.virtual_pipeline (2) needs"),
    (["--train.lr_warmup_steps", "500"], "train.lr_warmup_steps (500)"),
    (["--train.lr_warmup_fraction", "0.1", "--train.lr_warmup_steps", "3"],
     "train.lr_warmup_steps (3) and train.lr_warmup_fraction (0.1) are both set"),
    (["--model.num_layers"], "has no value"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="presets: 1p5b, 1p5b-scratch, 8b, 8b-scratch, tiny"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2")
    with pytest.raises(ConfigError, match="not valid YAML at line 1") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump({"model": {"num_layers": 3}, "train": {"seq_length": 32}}))
    cfg = load_config(path)
    assert cfg.model.num_layers == 3 and cfg.train.seq_length == 32


PAPER = {"1p5b": 50e9, "8b": 150e9}  # tokens of continual pretraining (arXiv 2511.08923, section 4.1)


@pytest.mark.parametrize("preset", list(PAPER))
def test_recipe_presets_follow_the_paper(preset):
    cfg = load_config(preset)
    t = cfg.train
    assert (t.lr, t.min_lr, t.lr_decay_style) == (1e-5, 3e-6, "cosine")
    assert t.lr_warmup_fraction == 0.01 and t.warmup_steps == int(0.01 * t.train_steps)  # 1% warm-up
    assert t.seq_length == 4096 and t.global_batch_size * t.seq_length == 2 ** 21  # 2M clean tokens a step
    assert abs(t.train_steps * 2 ** 21 - PAPER[preset]) < 2 ** 21  # the paper's token budget, to one step
    assert cfg.tidar.draft_block_size == 16 and t.bf16 and cfg.parallel.use_distributed_optimizer
    assert cfg.data.reset_attention_mask and cfg.data.reset_position_ids
    assert cfg.checkpoint.init_required  # it continues an AR checkpoint
    scratch = load_config(f"{preset}-scratch")
    assert scratch.train.lr == 3e-4 and not scratch.checkpoint.init_required and scratch.model.vocab_size is None
    assert (scratch.model.num_layers, scratch.train.train_steps) == (cfg.model.num_layers, t.train_steps)


def test_a_preset_can_build_on_another(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text("base: tiny\nmodel:\n  num_layers: 3\n")
    cfg = load_config(child)
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == load_config("tiny").model.hidden_size
    (tmp_path / "loop.yaml").write_text(f"base: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")



def test_a_base_file_is_found_beside_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "team").mkdir()
    (tmp_path / "team" / "common.yaml").write_text("base: tiny\ntrain:\n  seq_length: 48\ndata:\n")
    (tmp_path / "team" / "run.yaml").write_text("base: common.yaml\nmodel:\n  num_layers: 3\n")
    monkeypatch.chdir(tmp_path)  # not the folder of run.yaml
    cfg = load_config("team/run.yaml")
    assert (cfg.model.num_layers, cfg.train.seq_length) == (3, 48)
    assert cfg.data == load_config("tiny").data  # an empty section changes nothing
    (tmp_path / "team" / "orphan.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml: base: .*missing.yaml") as err:
        load_config("team/orphan.yaml")
    assert "\n" not in str(err.value)


def test_an_override_that_is_not_yaml_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"--data.path \(command line\): .* is not a value") as err:
        load_config("tiny", ["--data.path", "[unclosed"])
    assert "\n" not in str(err.value)

def test_import_hf_picks_the_recipe_for_the_model_size():
    from tidar_megatron.hf.config import parse_hf_config
    from tidar_megatron.convert.hf_import import recipe_preset

    qwen25_15b = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True)
    qwen3_8b = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    assert recipe_preset(parse_hf_config(qwen25_15b, set())) == "1p5b"
    assert recipe_preset(parse_hf_config(qwen3_8b, set())) == "8b"
