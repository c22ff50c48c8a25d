import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("IGDREC_NO_PROGRESS", "1")

from tiny_model import build_tokenizer, save_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer saved in HF format: pass it as `--model DIR`."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
