"""bench/gpu.py, the prepared GPU check: its code comparison, on the CPU here and on CUDA where there is one."""

from __future__ import annotations

import pytest
import torch

from bench.gpu import check_wsig
from tests.checkpoints import mlp_state, save_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    return [save_model(root / f"mlp-{seed}", mlp_state(seed)) for seed in (0, 1)]


# The CPU against itself everywhere; CUDA against the CPU on a machine that has a GPU (bench.gpu's point).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_codes_compared_bit_for_bit(folders, device):
    _, rows = check_wsig(folders, device)
    assert "whole-model codes identical: 2 of 2; most bits apart 0" in rows[1]
    assert rows[2].startswith("- per-block codes identical: ") and rows[2].split(": ")[1].split(" of ")[0] != "0"
