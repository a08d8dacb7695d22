"""The trainer process end to end: run directory, resume, signals, failures, DDP."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.trainers.trainer_utils import (
    REPO,
    check_eval_images,
    config,
    env,
    run_trainer,
    status,
    trainer_cmd,
    write_config,
)
from trainers.config import parse_config
from trainers.evaluate import eval_image_files, read_eval_images
from trainers.rundir import RunDir, read_jsonl

pytestmark = pytest.mark.slow


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "transformer" / "diffusion_pytorch_model.safetensors")


def weights_hash(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_run_directory_contract(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_trainer(config(), run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    st = status(run)
    assert st["status"] == "ok" and st["step"] == 30
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config_hash"] and cfg["train"]["steps"] == 30 and cfg["timesteps"]["shift"] == 1.0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert set(metrics[0]) == {"step", "name", "value", "time"}
    names = {m["name"] for m in metrics}
    assert {
        "train/loss",
        "train/images_per_s",
        "domain_fid",
        "attr_acc_mean",
        "heldout_attr_acc_mean",
        "eval/flow_loss",
    } <= names
    # eval/flow_loss is the mean of its per-level values (default 8 levels at (k + 0.5) / 8).
    last = {m["name"]: m["value"] for m in metrics if m["step"] == 30}
    levels = [v for k, v in last.items() if k.startswith("eval/flow_loss@t")]
    assert len(levels) == 8 and "eval/flow_loss@t0.0625" in last
    assert last["eval/flow_loss"] == pytest.approx(sum(levels) / 8)
    # The final evaluation's per-image results; the logged metrics are recomputed from them.
    files = eval_image_files(run)
    assert list(files) == [30] and files[30] == run / "evals" / "step_0000030.npz"
    images = read_eval_images(files[30])
    assert images.step == 30 and len(images.seen_seeds) == 8 and len(images.heldout_seeds) == 4
    check_eval_images(images, last)
    assert sorted({m["step"] for m in metrics if m["name"] == "train/loss"}) == [
        5,
        10,
        15,
        20,
        25,
        30,
    ]
    manifest = read_jsonl(run / "samples" / "manifest.jsonl")
    final = [r for r in manifest if r["tag"] == "final"]
    assert len(final) == 8  # 4 prompts x 2 seeds
    assert {"prompt_id", "prompt", "seed", "nfe", "cfg", "path"} <= set(final[0])
    assert all((run / "samples" / r["path"]).is_file() for r in final)
    assert (run / "checkpoints" / "latest.pt").is_file()
    for part in (
        "transformer/config.json",
        "text_encoder",
        "scheduler/scheduler_config.json",
        "harness.json",
    ):
        assert (run / "final" / part).exists(), part
    sched = json.loads((run / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["shift"] == 1.0
    assert (run / "stdout.log").read_text().count("step 30/30") == 1


def test_export_round_trip_reproduces_samples(tmp_path: Path) -> None:
    """The exported model, loaded through the real loading code, draws the trainer's samples."""
    from PIL import Image

    from trainers.export import load_export

    run = tmp_path / "run"
    proc = run_trainer(config(train={"steps": 10}), run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = load_export(run / "final")
    final = [r for r in read_jsonl(run / "samples" / "manifest.jsonl") if r["tag"] == "final"]
    images = model.generate(
        [r["prompt"] for r in final], [r["seed"] for r in final], steps=4, guidance=3.0
    )
    saved = torch.stack(
        [torch.from_numpy(np.array(Image.open(run / "samples" / r["path"]))) for r in final]
    )
    regenerated = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (saved.int() - regenerated.int()).abs().max() <= 1


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    cfg = config(train={"steps": 120, "checkpoint_every": 20, "log_every": 10})
    reference = tmp_path / "reference"
    proc = run_trainer(cfg, reference)
    assert proc.returncode == 0, proc.stderr[-3000:]

    run = tmp_path / "killed"
    run.mkdir()
    cfg_path = write_config(tmp_path / "killed.json", cfg)
    child = subprocess.Popen(
        trainer_cmd(cfg_path, run),
        env=env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "latest.pt").exists():
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert status(run) is None, (
        "the run finished before it could be killed; the test proves nothing"
    )
    killed_at = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)["step"]
    assert 0 < killed_at < 120

    proc = subprocess.run(
        trainer_cmd(cfg_path, run), env=env(), cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming at step {killed_at}" in proc.stdout
    a, b = final_weights(reference), final_weights(run)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # Metrics of the resumed run have no duplicate steps and match the reference.

    def loss(r: Path) -> list[tuple[int, float]]:
        return [
            (m["step"], m["value"])
            for m in read_jsonl(r / "metrics.jsonl")
            if m["name"] == "train/loss"
        ]

    assert [s for s, _ in loss(run)] == [s for s, _ in loss(reference)]
    for (_, x), (_, y) in zip(loss(run), loss(reference), strict=True):
        assert x == pytest.approx(y, rel=1e-4)


def test_sigterm_checkpoints_and_stops_then_resumes(tmp_path: Path) -> None:
    cfg = config(train={"steps": 5000, "checkpoint_every": 1000})
    run = tmp_path / "run"
    run.mkdir()
    cfg_path = write_config(tmp_path / "run.json", cfg)
    child = subprocess.Popen(
        trainer_cmd(cfg_path, run),
        env=env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        m["step"] >= 10 for m in read_jsonl(run / "metrics.jsonl")
    ):
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-3000:]
    st = status(run)
    assert st["status"] == "stopped", st
    ckpt = torch.load(run / "checkpoints" / "latest.pt", weights_only=False)
    assert ckpt["step"] == st["step"] >= 10  # checkpointed where it stopped, not at step 1000
    assert not (run / "final").exists()


def test_nan_loss_fails_with_step_and_reason(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_trainer(config(train={"lr": 1e30, "warmup_steps": 0, "grad_clip": None}), run)
    assert proc.returncode == 1
    st = status(run)
    assert st["status"] == "failed" and "non-finite loss" in st["reason"]
    assert (st["step"] >= 1 and f"step {st['step']}" in st["reason"]) or "at step" in st["reason"]


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = config(timesteps={"sampler": "logit-normal"}, train={"stepz": 3})
    proc = run_trainer(cfg, tmp_path / "run")
    assert proc.returncode == 2
    assert "timesteps.sampler" in proc.stderr and "train.stepz" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_image_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    proc = run_trainer(config(data={"kind": "folder", "path": str(missing)}), tmp_path / "run")
    assert proc.returncode == 2
    st = status(tmp_path / "run")
    assert st["status"] == "failed" and str(missing) in st["reason"]


def test_different_config_in_existing_run_dir_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert run_trainer(config(train={"steps": 5}), run).returncode == 0
    proc = run_trainer(config(train={"steps": 6}), run)
    assert proc.returncode == 2 and "different config" in proc.stderr


def test_ddp_two_ranks_agree_on_weights(tmp_path: Path) -> None:
    # Launched exactly as the study runner launches a trial that asks for two GPUs (torchrun,
    # one process per rank); without CUDA the ranks run on the CPU over gloo.
    from harness.launch import TrainerProcess

    run = tmp_path / "run"
    run.mkdir()
    cfg = parse_config(config(train={"steps": 12, "batch_size": 8}))
    RunDir(run).write_config(cfg.to_dict(), cfg.hash())  # as the runner writes it
    proc = TrainerProcess("trainers.flow", run, devices=None, gpus=2)
    assert "torch.distributed.run" in proc.cmd and "--nproc_per_node=2" in proc.cmd
    proc.start()
    outcome = proc.follow(lambda step, name, value: False, poll_s=0.2)
    assert outcome.state == "complete", outcome.reason + outcome.stderr_tail
    assert outcome.final["train/loss"] > 0
    st = status(run)
    hashes = st["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert hashes[0] == weights_hash(final_weights(run))
    assert st["world_size"] == 2


def test_image_folder_in_vae_latent_space(tmp_path: Path) -> None:
    """Real-data path: an image folder, a VAE from a local directory, a frozen text encoder
    (minilm) whose embeddings are cached; the export decodes through the same VAE."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from trainers.export import load_export

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"noise picture number {i % 3}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
    )
    vae.save_pretrained(tmp_path / "vae")
    cfg = config(
        data={
            "kind": "folder",
            "path": str(folder),
            "resolution": 16,
            "vae": str(tmp_path / "vae"),
        },
        text={"encoder": "minilm", "max_length": 8},
        model={"backbone": "sd3", "preset": "micro", "overrides": {"patch_size": 2}},
        train={"steps": 6, "batch_size": 4, "log_every": 3},
        sample={"steps": 2, "num_prompts": 2, "seeds": [0]},
    )
    run = tmp_path / "run"
    proc = run_trainer(cfg, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((run / "final" / "harness.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["vae"] == str(tmp_path / "vae")
    model = load_export(run / "final")
    images = model.generate(["noise picture number 1"], [0], steps=2)
    assert images.shape == (1, 3, 16, 16)
    names = {m["name"] for m in read_jsonl(run / "metrics.jsonl")}
    # No domain evaluator off the shapes data; the grid loss works on any data.
    assert {"train/loss", "eval/flow_loss"} <= names and "domain_fid" not in names
