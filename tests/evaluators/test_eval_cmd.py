"""``harness eval`` end to end, in process (typer's CliRunner): a run registered in the store, a
run directory and a plain folder, scored with a tiny random CLIP saved to disk; the scores and
their provenance in the store; the errors a user meets (missing weights, no captions, too few
images, unknown metric)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from evaluators import extractors as ex
from evaluators.scores import ProvenanceMismatchError, compare_scores, read_scores
from harness.cli import app
from harness.store import Store
from tests.evaluators.metric_nets import write_tiny_clip
from trainers.data.shapes import ShapesDataset

RES = 16


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(autouse=True)
def _env(clip_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ex.CLIP_ENV, str(clip_dir))
    monkeypatch.delenv(ex.INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached Inception


def _write_run(root: Path, *, guidance: float = 3.0, n: int = 6, seed: int = 5) -> Path:
    """A run directory as the trainer leaves it: config.json, samples/final/*.png, manifest."""
    ds = ShapesDataset(seed=seed, split="val", size=n, resolution=RES)
    (root / "samples" / "final").mkdir(parents=True)
    records = []
    for i in range(n):
        rel = f"final/p{i:03d}_s0.png"
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(root / "samples" / rel)
        records.append(
            {"prompt_id": i, "prompt": ds.captions[i], "seed": 0, "path": rel, "tag": "final",
             "step": 100, "nfe": 8, "cfg": guidance, "solver": "euler", "steps": 8, "shift": 1.0}
        )  # fmt: skip
    (root / "samples" / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"data": {"kind": "shapes", "seed": 0, "resolution": RES}, "config_hash": "abc"}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _eval(workdir: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["eval", *args, "--workdir", str(workdir)])
    return result.exit_code, result.output


def test_eval_a_registered_run_stores_scores_with_provenance(
    tmp_path: Path, clip_dir: Path
) -> None:
    work = tmp_path / "work"
    run_dir = _write_run(tmp_path / "runs" / "r0")
    Store(work / "harness.duckdb").ingest_run_dir("study/0", run_dir)
    code, out = _eval(work, "study/0", "--metrics", "cmmd,clip_score", "--reference-size", "8")
    assert code == 0, out
    assert "cmmd" in out and "clip_score" in out and "2 scores stored" in out
    store = Store(work / "harness.duckdb")
    rows = {r["metric"]: r for r in read_scores(store, ["study/0"])}
    assert set(rows) == {"cmmd", "clip_score"}
    cm = rows["cmmd"]
    assert cm["target_kind"] == "run" and cm["num_images"] == 6
    prov = cm["provenance"]
    assert prov["images"]["sampler"] == {
        "solver": "euler", "steps": 8, "nfe": 8, "guidance": 3.0, "shift": 1.0
    }  # fmt: skip
    assert prov["images"]["seeds"] == [0] and prov["images"]["tag"] == "final"
    assert prov["images"]["resolution"] == RES
    assert prov["extractor"]["weights_sha256"] == ex._clip_weights_sha256(clip_dir)
    assert prov["reference"]["dataset"] == "shapes" and prov["reference"]["num_images"] == 8
    assert prov["metric"] == {
        "name": "cmmd", "kernel": "rbf", "sigma": 10.0, "scale": 1000.0, "estimator": "unbiased"
    }  # fmt: skip
    assert rows["clip_score"]["provenance"]["reference"] is None

    # Again: the reference comes from the cache and the same scores are replaced, not added.
    code, out = _eval(work, "study/0", "--metrics", "cmmd", "--reference-size", "8")
    assert code == 0, out
    assert "CLIP features: reference" not in out
    again = read_scores(store, ["study/0"], "cmmd")
    assert len(again) == 1 and again[0]["value"] == pytest.approx(cm["value"], rel=1e-6)


def test_runs_sampled_differently_are_not_compared(tmp_path: Path) -> None:
    work = tmp_path / "work"
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", guidance=5.0)
    for run in (a, b):
        code, out = _eval(work, str(run), "--metrics", "cmmd", "--reference-size", "8")
        assert code == 0, out
    store = Store(work / "harness.duckdb")
    with pytest.raises(ProvenanceMismatchError, match=r"sampler\.guidance: 3\.0 vs 5\.0"):
        compare_scores(store, [str(a.resolve()), str(b.resolve())], "cmmd")


def test_plain_folder_clip_score_needs_captions(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    ds = ShapesDataset(seed=1, split="val", size=4, resolution=RES)
    for i in range(4):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    code, out = _eval(tmp_path / "w", str(folder), "--metrics", "clip_score")
    assert code == 2 and "metadata.jsonl" in out
    code, out = _eval(tmp_path / "w", str(folder), "--metrics", "cmmd")
    assert code == 2 and "--reference embedded" in out
    meta = "".join(
        json.dumps({"file_name": f"{i}.png", "text": ds.captions[i]}) + "\n" for i in range(4)
    )
    (folder / "metadata.jsonl").write_text(meta)
    code, out = _eval(tmp_path / "w", str(folder), "--metrics", "clip_score,cmmd",
                      "--reference", "embedded", "--reference-size", "6")  # fmt: skip
    assert code == 0, out
    rows = read_scores(Store(tmp_path / "w" / "harness.duckdb"), [str(folder.resolve())])
    assert {r["metric"] for r in rows} == {"clip_score", "cmmd"}
    assert all(r["target_kind"] == "folder" for r in rows)
    assert rows[0]["provenance"]["images"]["sampler"] is None


def test_user_errors_exit_2_with_the_fix(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", n=1)
    code, out = _eval(tmp_path / "w", str(run), "--metrics", "cmmd")
    assert code == 2 and "cmmd needs at least 2 generated images, got 1" in out
    code, out = _eval(tmp_path / "w", str(run), "--metrics", "fidd")
    assert code == 2 and "did you mean 'fid'" in out
    run2 = _write_run(tmp_path / "r2")
    code, out = _eval(tmp_path / "w", str(run2), "--metrics", "fid")
    assert code == 2
    assert ex.INCEPTION_URL in out and ex.INCEPTION_ENV in out
    code, out = _eval(tmp_path / "w", str(run2), "--metrics", "fid", "--resize", "clear")
    assert code == 2 and "did you mean 'clean'" in out
    code, out = _eval(tmp_path / "w", "no-such-run", "--metrics", "cmmd")
    assert code == 2 and "neither a run id" in out
    code, out = _eval(tmp_path / "w", str(run2), "--metrics", "cmmd", "--tag", "step_9")
    assert code == 2 and "no samples tagged 'step_9'" in out


@pytest.mark.slow
def test_domain_metrics_of_real_shapes_images(tmp_path: Path) -> None:
    """Real renders captioned with their own attributes: the attribute net (trained once per
    session cache, ~25 s) reads them right, and their domain FID against other real images is
    finite. Non-shapes prompts are refused."""
    run = _write_run(tmp_path / "r", n=8)
    code, out = _eval(tmp_path / "w", str(run), "--metrics", "domain_fid,attr_acc",
                      "--reference-size", "64")  # fmt: skip
    assert code == 0, out
    rows = {r["metric"]: r for r in read_scores(Store(tmp_path / "w" / "harness.duckdb"))}
    assert rows["attr_acc_mean"]["value"] >= 0.9
    assert 0 <= rows["domain_fid"]["value"] < 1e4
    assert rows["domain_fid"]["provenance"]["extractor"]["name"] == "attribute-net"
    folder = tmp_path / "other"
    folder.mkdir()
    Image.new("RGB", (RES, RES)).save(folder / "0.png")
    Image.new("RGB", (RES, RES), "white").save(folder / "1.png")
    meta = [{"file_name": f"{i}.png", "text": "a photo of a cat"} for i in range(2)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    code, out = _eval(tmp_path / "w", str(folder), "--metrics", "attr_acc")
    assert code == 2 and "need the embedded shapes captions" in out


def test_reference_folder_is_keyed_by_its_content(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r")
    real = tmp_path / "real"
    real.mkdir()
    ds = ShapesDataset(seed=9, split="val", size=5, resolution=24)  # resized to 16 on load
    for i in range(5):
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(real / f"{i}.png")
    args = ("--metrics", "cmmd", "--reference", str(real), "--reference-size", "4")
    code, out = _eval(tmp_path / "w", str(run), *args)
    assert code == 0, out
    store = Store(tmp_path / "w" / "harness.duckdb")
    (first,) = read_scores(store, metric="cmmd")
    ref = first["provenance"]["reference"]
    assert ref["dataset"] == "folder" and ref["num_images"] == 4 and ref["resolution"] == RES
    # Replacing one of the images used changes the reference, hence the provenance.
    Image.fromarray(ds.images[4].permute(1, 2, 0).numpy()).save(real / "0.png")
    code, out = _eval(tmp_path / "w", str(run), *args)
    assert code == 0, out
    rows = read_scores(store, metric="cmmd")
    assert len(rows) == 2 and len({r["provenance"]["reference"]["files_sha256"] for r in rows}) == 2


def test_samples_made_through_a_prompt_enhancer_carry_it_in_the_provenance(tmp_path: Path) -> None:
    """Scores of images made from rewritten prompts name the enhancer; scores of plain samples
    keep the provenance they had before enhancers existed (no null key), so their hashes hold."""
    from harness.evaluate_cmd import load_image_set

    store = Store(tmp_path / "harness.duckdb")
    plain = _write_run(tmp_path / "plain")
    enhanced = _write_run(tmp_path / "enhanced")
    prov = {"backend": "shapes", "version": "b9c092a1"}
    manifest = enhanced / "samples" / "manifest.jsonl"
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    for r in records:
        r |= {"enhanced_prompt": r["prompt"] + "!", "prompt_enhancer": prov}
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    store.ingest_run_dir("s/0", enhanced)  # the store keeps the manifest's extras in `extra`
    assert "prompt_enhancer" not in load_image_set(str(plain), store).provenance
    assert load_image_set(str(enhanced), store).provenance["prompt_enhancer"] == prov
    assert load_image_set("s/0", store).provenance["prompt_enhancer"] == prov
