"""The distillation trainer (``python -m trainers.distill``) end to end on a tiny teacher: every
method trains, evaluates, samples and exports on CPU; one step changes the student and not the
teacher; resume equals uninterrupted; the export samples like the trainer; teacher lookup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainers.trainer_utils import REPO, config, env, run_trainer
from trainers.config import ConfigError
from trainers.distill.config import METHODS, parse_distill_config
from trainers.distill.train import DistillTrainer, resolve_teacher
from trainers.export import load_export, state_dict_hash
from trainers.rundir import RunDir
from trainers.train import Dist


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny flow run (vocab text encoder: trainable in the teacher, frozen in the
    student)."""
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    cfg = config(train={"steps": 20}, eval={"every": 1000, "num_images": 4, "steps": 2})
    proc = run_trainer(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def distill_cfg(teacher: Path, method: str, steps: int = 2, **train: Any) -> dict[str, Any]:
    return {
        "seed": 3,
        "teacher": str(teacher),
        "distill": {
            "method": method,
            "steps": steps,
            "guidance": 1.5,
            "progressive": {"teacher_steps": 4 * steps},
            "consistency": {"grid": 8, "skip": 2},
            "reflow": {"pairs": 16, "pair_steps": 3, "distill_fraction": 0.5},
            "dmd": {"pairs": 8, "pair_steps": 3, "fake_updates": 1},
        },
        "train": {
            "steps": 4,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 0,
            "log_every": 2,
            "checkpoint_every": 100,
        }
        | train,
        "eval": {"every": 1000, "num_images": 4, "reference_images": 64, "loss_images": 0},
        "sample": {"num_prompts": 2, "seeds": [0]},
    }


def make(teacher: Path, run_dir: Path, method: str, **kw: Any) -> DistillTrainer:
    cfg = parse_distill_config(distill_cfg(teacher, method, **kw))
    run = RunDir(run_dir)
    run.create()
    return DistillTrainer(cfg, run, Dist())


def weights(module: torch.nn.Module) -> str:
    return state_dict_hash(module.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_the_student_not_the_teacher(
    teacher: Path, tmp_path: Path, method: str
) -> None:
    tr = make(teacher, tmp_path / "run", method)
    exported = load_export(teacher / "final")
    assert weights(tr.net.denoiser) == weights(exported.denoiser)  # starts as the teacher
    teacher_before = weights(tr.teacher)
    text_before = weights(tr.net.text_encoder)
    assert not any(p.requires_grad for p in tr.teacher.parameters())
    assert all(p.requires_grad is False for p in tr.net.text_encoder.parameters())
    loss, _ = tr.train_step()
    assert torch.isfinite(torch.tensor(loss))
    assert weights(tr.net.denoiser) != weights(exported.denoiser)
    assert weights(tr.teacher) == teacher_before == weights(exported.denoiser)
    assert weights(tr.net.text_encoder) == text_before


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_uninterrupted(teacher: Path, tmp_path: Path, method: str) -> None:
    full = make(teacher, tmp_path / "full", method)
    for _ in range(4):
        full.train_step()

    part = make(teacher, tmp_path / "part", method)
    for _ in range(2):
        part.train_step()
    part.save_checkpoint()
    del part
    resumed = make(teacher, tmp_path / "part", method)
    assert resumed.try_resume() and resumed.step == 2
    for _ in range(2):
        resumed.train_step()

    assert weights(resumed.net.denoiser) == weights(full.net.denoiser)
    assert weights(resumed.method) == weights(full.method)


def test_every_method_runs_end_to_end_as_a_process(teacher: Path, tmp_path: Path) -> None:
    """The CLI: each method's student trains, evaluates at its step count with its sampler,
    writes samples and exports; the export re-generates the trainer's samples exactly."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from trainers.data.shapes import to_uint8

    for method in METHODS:
        run_dir = tmp_path / method
        cfg_path = tmp_path / f"{method}.json"
        cfg_path.write_text(json.dumps(distill_cfg(teacher, method, steps=2)))
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "trainers.distill",
                "--config",
                str(cfg_path),
                "--run-dir",
                str(run_dir),
            ],
            env=env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, f"{method}: {proc.stderr[-3000:]}"
        run = RunDir(run_dir)
        status = run.read_status()
        assert status["status"] == "ok" and status["step"] == 4
        metrics = {r["name"] for r in run.read_metrics()}
        assert {"domain_fid", "attr_acc_mean", "eval/nfe", "train/loss"} <= metrics
        manifest = [json.loads(x) for x in run.manifest.read_text().splitlines()]
        final = [m for m in manifest if m["tag"] == "final"]
        assert final and all(m["nfe"] == 2 and m["cfg"] == 1.0 for m in final)
        meta = json.loads((run.final / "harness.json").read_text())
        assert meta["distill"]["method"] == method and meta["distill"]["steps"] == 2
        model = load_export(run.final)
        m = final[0]
        img = model.generate([m["prompt"]], [m["seed"]], steps=2)
        saved = torch.from_numpy(np.array(Image.open(run.samples / m["path"])))
        assert torch.equal(to_uint8(img)[0].permute(1, 2, 0), saved), method


def test_student_sampler_depends_on_the_method(teacher: Path, tmp_path: Path) -> None:
    """ODE students integrate Euler; consistency-type students predict x0 and re-noise."""
    from trainers.sampling import initial_noise, sample, sample_student

    exported = load_export(teacher / "final")
    text = exported.text_encoder(["a small red circle in the center on a black background"])
    noise = initial_noise([5], exported.latent_shape)
    ode = sample_student(
        exported.denoiser, noise, text, sampler="ode", steps=3, shift=exported.shift, seeds=[5]
    )
    euler = sample(
        exported.denoiser, noise, text, None, steps=3, shift=exported.shift, guidance=1.0
    )
    torch.testing.assert_close(ode, euler)
    one = sample_student(
        exported.denoiser, noise, text, sampler="consistency", steps=1, shift=1.0, seeds=[5]
    )
    t1 = torch.ones(1)
    torch.testing.assert_close(one, noise - exported.denoiser(noise, t1, text))


def test_bad_teacher_and_bad_progressive_steps_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="power of two"):
        parse_distill_config({"teacher": "x", "distill": {"method": "progressive", "steps": 3}})
    cfg = parse_distill_config({"teacher": str(tmp_path / "nope")})
    with pytest.raises(Exception, match="neither a finished run directory"):
        resolve_teacher(cfg)
    export_only = tmp_path / "export"
    export_only.mkdir()
    (export_only / "harness.json").write_text("{}")
    with pytest.raises(ConfigError, match="give `data:`"):
        resolve_teacher(parse_distill_config({"teacher": str(export_only)}))
