"""CUDA paths: bf16 autocast, TF32, torch.compile. Skipped on machines without a GPU."""

from pathlib import Path

import pytest
import torch

from tests.trainers.trainer_utils import config, run_trainer, status

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("compile_", [False, True])
def test_cuda_bf16_training_run(tmp_path: Path, compile_: bool) -> None:
    cfg = config(train={"steps": 20, "precision": "bf16", "compile": compile_})
    proc = run_trainer(cfg, tmp_path / "run", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = status(tmp_path / "run")
    assert st["status"] == "ok" and "device cuda" in (tmp_path / "run" / "stdout.log").read_text()
