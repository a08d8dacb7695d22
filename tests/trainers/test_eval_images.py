"""Per-image evaluation results in the run directory: the file, its reader, its invariant with
the logged metrics, and its truncation on resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.trainers.trainer_utils import check_eval_images, config
from trainers.config import parse_config
from trainers.data.shapes import ATTRIBUTE_NAMES
from trainers.evaluate import (
    EvalImages,
    eval_image_files,
    read_eval_images,
    write_eval_images,
)
from trainers.rundir import RunDir

A = len(ATTRIBUTE_NAMES)


def fake_images(step: int = 5, n: int = 6, m: int = 3, f: int = 4) -> EvalImages:
    rng = np.random.default_rng(step)
    return EvalImages(
        attributes=np.array(ATTRIBUTE_NAMES),
        seen_labels=rng.integers(0, 3, (n, A)),
        seen_correct=rng.random((n, A)) < 0.7,
        seen_features=rng.standard_normal((n, f)),
        seen_seeds=np.arange(n),
        heldout_labels=rng.integers(0, 3, (m, A)),
        heldout_correct=rng.random((m, A)) < 0.5,
        heldout_seeds=np.arange(m),
        reference_mean=rng.standard_normal(f),
        reference_cov=np.eye(f),
        step=step,
    )


def assert_equal(a: EvalImages, b: EvalImages) -> None:
    for field in dataclasses.fields(EvalImages):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert np.array_equal(x, y), field.name


def test_write_read_round_trip_without_pickle(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    images = fake_images(step=40)
    write_eval_images(run.eval_images(40), images)
    path = tmp_path / "run" / "evals" / "step_0000040.npz"
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == [path.name]  # no tmp
    back = read_eval_images(path)
    assert_equal(images, back)
    assert back.step == 40 and isinstance(back.step, int)
    assert back.seen_labels.dtype == np.int64 and back.seen_correct.dtype == bool
    assert back.seen_features.dtype == np.float64 and back.attributes.dtype.kind == "U"
    with np.load(path, allow_pickle=False) as npz:  # readable without pickle
        assert set(npz.files) == {f.name for f in dataclasses.fields(EvalImages)}
        assert npz["step"].shape == () and npz["step"].dtype == np.int64


def test_eval_image_files_by_step(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    assert eval_image_files(run.root) == {}
    for step in (100, 7, 2000):
        write_eval_images(run.eval_images(step), fake_images(step))
    (run.evals / ".step_0000009.npz.tmp123").write_bytes(b"torn")
    (run.evals / "notes.txt").write_text("x")
    files = eval_image_files(run.root)
    assert list(files) == [7, 100, 2000]
    assert files[7] == run.root / "evals" / "step_0000007.npz"


def test_reader_names_the_file_and_the_problem(tmp_path: Path) -> None:
    good = dataclasses.asdict(fake_images())
    path = tmp_path / "step_0000005.npz"

    np.savez_compressed(path, **{k: v for k, v in good.items() if k != "reference_cov"})
    with pytest.raises(ValueError, match=r"step_0000005\.npz.*missing key.*reference_cov"):
        read_eval_images(path)

    np.savez_compressed(path, **(good | {"seen_correct": good["seen_correct"][:4]}))
    with pytest.raises(ValueError, match=r"step_0000005\.npz: seen_correct has shape \[4, 5\]"):
        read_eval_images(path)

    np.savez_compressed(path, **(good | {"reference_cov": np.eye(3)}))
    with pytest.raises(ValueError, match=r"step_0000005\.npz: reference_cov has shape"):
        read_eval_images(path)

    np.savez_compressed(path, **(good | {"seen_labels": good["seen_labels"].astype(float)}))
    with pytest.raises(ValueError, match="seen_labels has dtype"):
        read_eval_images(path)

    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"step_0000005\.npz: not a readable"):
        read_eval_images(path)
    with pytest.raises(FileNotFoundError):
        read_eval_images(tmp_path / "missing.npz")


def test_truncate_after_deletes_later_eval_files(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    for step in (10, 20, 30):
        run.log_metrics(step, {"domain_fid": float(step)})
        write_eval_images(run.eval_images(step), fake_images(step))
    run.truncate_after(20)
    assert list(run.eval_image_files()) == [10, 20]
    assert [m["step"] for m in run.read_metrics()] == [10, 20]
    run.truncate_after(0)
    assert run.eval_image_files() == {}


# ----------------------------------------------------------------------------------------------
# a real (tiny) evaluation in the trainer, with a random attribute net (no training)


@pytest.fixture
def random_attribute_net(monkeypatch: pytest.MonkeyPatch) -> None:
    import trainers.domain as D

    def load(*args: Any, device: Any = None, **kwargs: Any) -> D.AttributeNet:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return D.AttributeNet().eval()

    monkeypatch.setattr(D, "load_attribute_net", load)


def tiny_trainer(run_dir: Path, steps: int = 4):
    from trainers.train import Dist, FlowTrainer

    cfg = config(
        data={"kind": "shapes", "resolution": 16, "size": 64, "seed": 0},
        train={"steps": steps, "batch_size": 8, "checkpoint_every": 2, "warmup_steps": 2},
        eval={"every": 2, "num_images": 12, "reference_images": 32, "steps": 2, "loss_images": 8},
    )
    run = RunDir(run_dir)
    run.create()
    return FlowTrainer(parse_config(cfg), run, Dist())


def test_trainer_evaluation_writes_per_image_results(
    tmp_path: Path, random_attribute_net: None
) -> None:
    t = tiny_trainer(tmp_path / "run")
    t.train_step()
    t.train_step()
    logged = t.evaluate()
    files = eval_image_files(t.run.root)
    assert list(files) == [2]
    images = read_eval_images(files[2])
    assert images.step == 2
    n, m = len(t.evaluator.seen), len(t.evaluator.heldout)
    assert images.seen_labels.shape == (n, A) and images.heldout_labels.shape == (m, A)
    assert images.seen_features.shape == (n, t.evaluator.net.feature_dim)
    assert np.array_equal(images.seen_labels, [a.labels for a in t.evaluator.seen])
    assert np.array_equal(images.heldout_labels, [a.labels for a in t.evaluator.heldout])
    assert np.array_equal(images.seen_seeds, np.arange(n))  # row i: prompt i, seed i
    assert np.array_equal(images.heldout_seeds, np.arange(m))
    ref_mean, ref_cov = t.evaluator.reference
    assert np.array_equal(images.reference_mean, ref_mean.numpy())
    assert np.array_equal(images.reference_cov, ref_cov.numpy())
    check_eval_images(images, logged)
    # the metrics file holds the same values
    last = {r["name"]: r["value"] for r in t.run.read_metrics() if r["step"] == 2}
    assert last["domain_fid"] == pytest.approx(logged["domain_fid"])


@pytest.mark.slow  # two evaluations and a resume: ~5 s alone, ~20 s on a busy 2-core box
def test_resume_drops_later_eval_files(tmp_path: Path, random_attribute_net: None) -> None:
    first = tiny_trainer(tmp_path / "run")
    first.train_step()
    first.train_step()
    first.save_checkpoint()  # at step 2
    first.evaluate()
    first.train_step()
    first.train_step()
    first.evaluate()
    assert list(eval_image_files(first.run.root)) == [2, 4]
    second = tiny_trainer(tmp_path / "run")
    assert second.try_resume() and second.step == 2
    assert list(eval_image_files(second.run.root)) == [2]
