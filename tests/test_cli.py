"""The command line a newcomer meets: one entry point, one error convention, help that lists every field,
checks before any process group, the vocabulary taken from the tokenizer, and an install outside the
repository that finds the presets."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tidar_megatron.cli import main
from tidar_megatron.config import ConfigError, describe, load_config, resolve_vocabulary

REPO = Path(__file__).resolve().parent.parent


def _cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tidar_megatron", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_unknown_command_names_the_nearest(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidar-megatron: error: unknown command 'trian'; did you mean 'train'?")
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("train", "tokenize", "train-tokenizer", "evaluate", "export", "import-hf", "generate"):
        assert f"  {command} " in usage


def test_train_help_lists_every_field_without_megatron():
    code = ("import sys, time; t = time.time(); from tidar_megatron.cli import main; main(['train', '--help']); "
            "print('MEGATRON' if any(m.startswith('megatron') for m in sys.modules) else 'clean', time.time() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.rstrip().splitlines()[-1].startswith("clean")
    for line in describe().splitlines():
        assert line in out
    assert "--model.attention_backend STR" in out and "one of auto, local, flex, te, kernel" in out
    assert "--train.lr FLOAT" in out and "(default 0.0003" in out and "--data.blend LIST OF STR" in out


def test_misspelt_fields_name_the_command_line_and_the_nearest_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["--model.num_layer", "3"])
    assert str(e.value) == ("--model.num_layer (command line): unknown field(s) model.num_layer; did you mean "
                            "--model.num_layers?")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_layer: 3\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown field\(s\) model.num_layer; did you mean model.num_layers"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"^--train.lr \(command line\): train.lr must be float"):
        load_config("tiny", ["--train.lr", "fast"])
    with pytest.raises(ConfigError, match="did you mean 'tiny'"):
        load_config("tiny2")


def test_every_subcommand_reports_user_errors_the_same_way(tmp_path):
    cases = [
        (["train", "--config", "tiny"], "data.blend is empty"),
        (["train", "--data.blend", str(tmp_path / "nope"), "--data.tokenizer", "x.model"], "nope.bin and"),
        (["generate", "--model", str(tmp_path / "nonexistent"), "--prompt", "x"], "nonexistent: not found"),
        (["export", "--checkpoint", str(tmp_path), "--output", str(tmp_path / "hf")], "no checkpoint"),
        (["tokenize", "--input", str(tmp_path / "none"), "--output-prefix", str(tmp_path / "o"),
          "--tokenizer", "t.model"], "t.model: not found"),
        (["evaluate", "--model", str(tmp_path / "nonexistent"), "--output", str(tmp_path / "r.json"),
          "--prompts", "p.jsonl"], "nonexistent: not found"),
    ]
    for args, message in cases:
        proc = _cli(*args)
        err = proc.stderr.strip()
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert err.startswith(f"tidar-megatron {args[0]}: error: ") and message in err, (args, err)
        assert len(err.splitlines()) == 1, (args, err)


def test_data_and_tokenizer_are_checked_before_any_process_group(corpus, tmp_path):
    import torch

    from tidar_megatron.training.loop import train

    cfg = load_config("tiny", ["--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"],
                               "--model.vocab_size", "100", "--checkpoint.dir", str(tmp_path)])
    started = time.time()
    with pytest.raises(ConfigError, match=rf"model.vocab_size \(100\) is smaller than the vocabulary of "
                                          rf"data.tokenizer .*\({corpus['vocab']}\)"):
        train(cfg)
    assert not torch.distributed.is_initialized() and time.time() - started < 30
    cfg = load_config("tiny", ["--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"],
                               "--data.split", "90,10,0", "--checkpoint.init_from", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="checkpoint.init_from .*missing: no checkpoint there"):
        train(cfg)
    assert not torch.distributed.is_initialized()
    cfg = load_config("tiny", ["--data.blend", corpus["prefix"], "--data.tokenizer", corpus["tokenizer"]])
    with pytest.raises(ConfigError, match=r"the valid split of data.split='98,1,1' holds no tokens"):
        train(cfg)  # 5 documents: 1% of them is none
    assert not torch.distributed.is_initialized()


def test_the_vocabulary_comes_from_the_tokenizer():
    cfg = load_config("tiny", ["--data.tokenizer", "tok.model"])
    assert cfg.model.vocab_size is None and cfg.tidar.mask_token_id is None
    resolve_vocabulary(cfg, vocab_size=500, mask_token_id=3, source="tok.model")
    assert (cfg.model.vocab_size, cfg.tidar.mask_token_id, cfg.padded_vocab_size) == (500, 3, 512)
    # An explicit, larger vocabulary (a converted checkpoint's padded embedding) and mask id are kept.
    cfg = load_config("tiny", ["--data.tokenizer", "tok.model", "--model.vocab_size", "640",
                               "--tidar.mask_token_id", "640"])
    resolve_vocabulary(cfg, vocab_size=500, mask_token_id=3, source="tok.model")
    assert (cfg.model.vocab_size, cfg.tidar.mask_token_id) == (640, 640)
    with pytest.raises(ConfigError, match="set data.tokenizer"):
        load_config("tiny").padded_vocab_size


def test_directory_inputs_take_text_files_only(tmp_path, corpus):
    from tidar_megatron.data.corpus import find_inputs
    from tidar_megatron.data.tokenize_corpus import tokenize_corpus

    tree = tmp_path / "src"
    (tree / "__pycache__").mkdir(parents=True)
    (tree / "a.py").write_text("print('a')\n")
    (tree / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\xcb\r\r\n\x00\x00\x00\x00" + bytes(range(256)))
    assert find_inputs([str(tree)]) == [str(tree / "a.py")]
    summary = tokenize_corpus([str(tree)], str(tmp_path / "out"), corpus["tokenizer"], workers=1, progress=False)
    assert summary["docs"] == 1 and summary["error_count"] == 0


@pytest.mark.slow
def test_a_non_editable_install_outside_the_repository_finds_the_presets_and_trains(tmp_path, corpus):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                              "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    assert sorted(p.name for p in (target / "tidar_megatron" / "presets").glob("*.yaml")) == \
        sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-c", "import tidar_megatron.config as c; print(c.__file__); "
                           "print([c.load_config(p).model.num_layers for p in c.preset_names()])"],
                          capture_output=True, text=True, cwd=work, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(target / "tidar_megatron" / "config.py"), "[28, 28, 36, 36, 2]"]
    proc = _cli("train", "--config", "tiny", "--data.blend", corpus["prefix"], "--data.tokenizer",
                corpus["tokenizer"], "--train.train_steps", "2", "--train.lr_warmup_steps", "0",
                "--train.eval_interval", "0", "--checkpoint.dir", str(work / "run"), "--log.wandb_mode", "disabled",
                cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "run" / "iter_0000002").is_dir() and "step 2/2 loss" in proc.stderr


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`tidar-megatron generate ... | head -1`: the closed pipe ends the command with 141, no traceback."""
    script = ("from tidar_megatron.console import entry_point\n"
              "@entry_point('tidar-megatron generate')\n"
              "def main(argv=None):\n"
              "    while True:\n"
              "        print('token ' * 1000, flush=True)\n"
              "raise SystemExit(main())\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # as head does after its lines
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and b"Traceback" not in err and b"Exception ignored" not in err, err


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_a_device_the_machine_lacks_is_one_line(tmp_path, capsys):
    """generate / evaluate / serve load through one function, which refuses --device cuda without a GPU (and a
    device torch does not know) before reading the checkpoint."""
    from tidar_megatron.testing import tiny_hf_checkpoint

    tiny_hf_checkpoint(tmp_path, tidar_mask_token_id=127, tidar_draft_block_size=4)
    capsys.readouterr()
    for device, why in (("cuda", "no CUDA device is available"), ("gpu", "not a device torch knows")):
        assert main(["generate", "--model", str(tmp_path), "--prompt-ids", "5,6", "--device", device]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"--device {device}: {why}" in err[0], err
        assert main(["serve", "--model", str(tmp_path), "--device", device]) != 0
        assert f"--device {device}: {why}" in capsys.readouterr().err
