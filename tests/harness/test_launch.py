"""CPU trials share the cores: each trainer gets its share of intra-op threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.launch import TrainerProcess
from harness.runner import cpu_threads_per_trial


def test_cores_are_divided_among_cpu_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4})
    assert cpu_threads_per_trial(0) is None  # GPU slots only: not our business
    assert cpu_threads_per_trial(1) == 5
    assert cpu_threads_per_trial(2) == 2
    assert cpu_threads_per_trial(8) == 1  # never zero


def test_trainer_env_sets_threads_on_cpu_only_and_respects_the_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = TrainerProcess("trainers.flow", tmp_path / "a", devices=None, cpu_threads=1)
    assert cpu.env["OMP_NUM_THREADS"] == "1"
    gpu = TrainerProcess("trainers.flow", tmp_path / "b", devices=["0"], cpu_threads=1)
    assert "OMP_NUM_THREADS" not in gpu.env and gpu.env["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    mine = TrainerProcess("trainers.flow", tmp_path / "c", devices=None, cpu_threads=1)
    assert mine.env["OMP_NUM_THREADS"] == "3"
