"""`precision`: how `--precision` resolves on a device, and which values are refused."""

import pytest
import torch

from igdrec import options
from igdrec.config import SFTConfig
from igdrec.errors import IgdrecError
from igdrec.precision import Precision, resolve_precision


def test_resolution_and_bad_values():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == Precision("fp32", torch.float32, None)
    assert resolve_precision("bf16-mixed", cpu).autocast == torch.bfloat16
    assert resolve_precision("bf16", cpu) == Precision("bf16", torch.bfloat16, None)
    with pytest.raises(IgdrecError, match=r"--precision.*bf16mixed.*bf16-mixed"):
        options.check(SFTConfig(precision="bf16mixed"))
    assert options.key_params(SFTConfig(precision="bf16")) != options.key_params(SFTConfig())  # part of the cache key
    assert options.key_params(SFTConfig(compile=True)) == options.key_params(SFTConfig())  # a run setting
