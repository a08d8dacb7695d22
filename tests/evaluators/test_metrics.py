"""The metric registry is the one place a metric is defined: its names, directions and image
minimums are read from it, and a metric added to it runs end to end through ``harness eval``."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
import torch

from evaluators import image_metrics as im
from evaluators import metrics as M
from evaluators.scores import read_scores
from harness import evaluate_cmd
from harness.store import Store

# The tiny CLIP on disk and its environment, as the eval command tests use them.
from tests.evaluators.test_eval_cmd import _env, _eval, _write_run, clip_dir  # noqa: F401


def test_every_metric_names_a_family_and_an_importable_compute_function() -> None:
    assert set(M.FAMILIES) == set(typing.get_args(M.Family))
    for name, info in M.METRICS.items():
        assert info.family in M.FAMILIES
        assert callable(M.compute_function(name)), name
    assert tuple(M.METRICS) == evaluate_cmd.ALL_METRICS


def test_minimums_and_directions_come_from_the_registry() -> None:
    with pytest.raises(im.NotEnoughImagesError, match="covariance of the features"):
        im.require_images("fid", 1, "generated")
    assert M.higher_is_better("kid_std") is False
    assert M.higher_is_better("attr_acc/shape") is True
    assert M.higher_is_better("attr_all_correct") is True
    assert M.higher_is_better("clip_score") is True
    with pytest.raises(KeyError, match="no metric stores scores named 'psnr'"):
        M.higher_is_better("psnr")
    with pytest.raises(KeyError, match="did you mean 'fid'"):
        M.compute_function("fdi")


def score_mean_norm(inp: M.MetricInputs) -> list[tuple[str, float, dict]]:
    return [("clip_norm", float(torch.linalg.vector_norm(inp.fake, dim=1).mean()), {"n": 1})]


def test_a_metric_added_to_the_registry_runs_through_harness_eval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new = M.MetricInfo("clip", f"{__name__}:score_mean_norm", True, 1, "it averages", True)
    monkeypatch.setitem(M.METRICS, "clip_norm", new)
    monkeypatch.setattr(evaluate_cmd, "ALL_METRICS", tuple(M.METRICS))
    run = _write_run(tmp_path / "r")
    code, out = _eval(tmp_path / "w", str(run), "--metrics", "clip_norm,cmmd",
                      "--reference-size", "8")  # fmt: skip
    assert code == 0, out
    rows = {r["metric"]: r for r in read_scores(Store(tmp_path / "w" / "harness.duckdb"))}
    assert set(rows) == {"clip_norm", "cmmd"}
    # One family, one pass of the network: both share the extractor's provenance.
    assert rows["clip_norm"]["provenance"]["extractor"] == rows["cmmd"]["provenance"]["extractor"]
    assert rows["clip_norm"]["value"] > 0
