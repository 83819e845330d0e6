import os
import sys
from pathlib import Path

import pytest
import torch

from tidar_megatron.console import NOISY_WARNINGS

# Test helpers (multirank.py) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("WANDB_MODE", "disabled")
# Without a GPU the Triton kernels run in Triton's CPU interpreter, which must be chosen before triton is
# first imported (torch does not import it; megatron.core and tidar_kernels do, later).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The third-party warnings the entry points filter (tidar_megatron/console.py), and only those.
    for category, message in NOISY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category}")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared cores: threads cost more than they give."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small tokenizer and .bin/.idx made from a few standard-library modules."""
    import sysconfig

    from tidar_megatron.data.tokenize_corpus import tokenize_corpus
    from tidar_megatron.data.tokenizer import Tokenizer, train_sentencepiece

    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [str(stdlib / n) for n in ("argparse.py", "textwrap.py", "json/decoder.py", "csv.py", "string.py")]
    train_sentencepiece((Path(f).read_text() for f in files), str(root / "tok.model"), vocab_size=512)
    tokenize_corpus(files, str(root / "corpus"), str(root / "tok.model"), workers=1, progress=False)
    tok = Tokenizer(str(root / "tok.model"))
    return {"prefix": str(root / "corpus"), "tokenizer": str(root / "tok.model"), "vocab": tok.vocab_size,
            "mask": tok.mask_id}
