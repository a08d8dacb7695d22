"""``sample.prompt_enhancer`` in the trainer: samples and evaluations are generated from the
rewritten prompts, and the manifest, ``final/harness.json`` and the store keep the original
prompt, the rewritten one and the enhancer's provenance; a bad enhancer fails before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.trainers.trainer_utils import config, run_trainer, status
from trainers.config import ConfigError, parse_config
from trainers.rundir import read_jsonl

TERSE = ["red ball", "big blue box top left"]


def test_samples_record_the_original_and_the_enhanced_prompt(tmp_path: Path) -> None:
    cfg = config(
        train={"steps": 2, "log_every": 1, "checkpoint_every": 100, "warmup_steps": 1},
        eval={"every": 1000, "num_images": 2, "reference_images": 8, "steps": 1,
              "loss_images": 0, "terse_prompts": True},
        sample={"steps": 1, "prompts": TERSE, "seeds": [0],
                "prompt_enhancer": {"backend": "shapes"}},
    )  # fmt: skip
    run = tmp_path / "run"
    proc = run_trainer(cfg, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [r for r in read_jsonl(run / "samples" / "manifest.jsonl") if r["tag"] == "final"]
    assert [r["prompt"] for r in records] == TERSE
    prov = records[0]["prompt_enhancer"]
    assert prov["backend"] == "shapes" and prov["version"]
    for r in records:
        assert r["enhanced_prompt"] != r["prompt"]
        assert r["enhanced_prompt"].startswith("a ") and r["enhanced_prompt"].endswith("background")
    assert "red circle" in records[0]["enhanced_prompt"]
    assert json.loads((run / "final" / "harness.json").read_text())["prompt_enhancer"] == prov
    assert f'"version": "{prov["version"]}"' in (run / "stdout.log").read_text()
    final = {r["name"]: r["value"] for r in read_jsonl(run / "metrics.jsonl") if r["step"] == 2}
    assert 0.0 <= final["terse_all_named"] <= final["terse_attr_acc"] <= 1.0

    # The store keeps both prompts and the provenance (manifest extras go to samples.extra).
    from harness.store import Store

    store = Store(tmp_path / "harness.duckdb")
    store.ingest_run_dir("r", run)
    rows = [r for r in store.samples("r") if r["tag"] == "final"]
    assert [r["prompt"] for r in rows] == TERSE
    assert all(r["extra"]["prompt_enhancer"] == prov for r in rows)
    assert [r["extra"]["enhanced_prompt"] for r in rows] == [r["enhanced_prompt"] for r in records]


def test_bad_enhancer_fails_before_training(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HARNESS_ENHANCER_BASE_URL", raising=False)
    cfg = config(sample={"prompt_enhancer": {"backend": "openai"}})
    proc = run_trainer(cfg, tmp_path / "run")
    assert proc.returncode == 2
    st = status(tmp_path / "run")
    assert st["status"] == "failed"
    assert "sample.prompt_enhancer" in st["reason"] and "HARNESS_ENHANCER_BASE_URL" in st["reason"]
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"backend": "gpt"}, "sample.prompt_enhancer.backend"),
        ({"backend": "transformers"}, "path is required"),
        ({"backend": "shapes", "path": "/x"}, "only for backend 'transformers'"),
        ({"backend": "shapes", "model": "m"}, "only for backend 'openai'"),
        ({"backend": "shapes", "temperature": 0}, "sample.prompt_enhancer.temperature"),
    ],
)
def test_enhancer_config_errors_name_the_key(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(config(sample={"prompt_enhancer": bad}))


def test_terse_evaluation_scores_the_named_attributes_of_what_it_was_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The evaluator renders every terse prompt through ``generate`` (the trainer passes the
    enhancer's rewrites) and scores only the attributes each prompt names."""
    import numpy as np
    import torch

    import trainers.domain as domain
    from trainers.data.terse import named_labels, terse_prompts
    from trainers.evaluate import ShapesEvaluator

    prompts = terse_prompts()
    truth = named_labels(prompts)
    # The "network" sees every named attribute right on even rows, none on odd rows.
    predicted = np.where(truth >= 0, truth, 0)
    predicted[1::2] = np.where(truth[1::2] >= 0, truth[1::2] + 1, 0)
    monkeypatch.setattr(domain, "predict_labels", lambda net, images: torch.from_numpy(predicted))
    evaluator = object.__new__(ShapesEvaluator)
    evaluator.net, evaluator.terse = None, prompts
    seen: list[list[str]] = []

    def generate(texts, seeds):
        seen.append(list(texts))
        assert list(seeds) == list(range(len(texts)))
        return torch.zeros(len(texts), 3, 16, 16)

    out = evaluator._terse(generate)
    assert seen == [[p.prompt for p in prompts]]
    even = (len(prompts) + 1) // 2
    assert out["terse_attr_acc"] == pytest.approx(even / len(prompts))
    assert out["terse_all_named"] == pytest.approx(even / len(prompts))
    assert "terse_prompts" not in parse_config(config()).to_dict()["eval"]  # hash unchanged
