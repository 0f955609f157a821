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


def test_codes_compared_bit_for_bit(folders):
    _, rows = check_wsig(folders, "cpu")
    assert "whole-model codes identical: 2 of 2; most bits apart 0" in rows[1]
    assert rows[2].startswith("- per-block codes identical: ") and rows[2].split(": ")[1].split(" of ")[0] != "0"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_wsig_on_cuda_gives_the_cpu_codes(folders):
    _, rows = check_wsig(folders, "cuda")
    assert "whole-model codes identical: 2 of 2" in rows[1]
