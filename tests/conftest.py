import os
import sys
from pathlib import Path

import pytest

# The shared helpers (tests/helpers/) are imported by module name: `from fixtures import synthetic_run`.
sys.path.insert(0, str(Path(__file__).parent / "helpers"))
os.environ.setdefault("IGDREC_NO_PROGRESS", "1")

from tiny_model import build_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer saved in HF format: pass it as `--model DIR`."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models run fastest on one thread: their matmuls are too small to split, and on a busy 2-core
    machine two OpenMP threads that keep losing their core make a step 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
