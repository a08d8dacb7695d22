"""Prompt enhancement in the harness: measuring prompt following with and without an enhancer
(``harness prompts measure``), and enhanced arena contestants (renders keep the original and the
rewritten prompt and the enhancer's provenance).

The two tiny runs of ``tests/harness/test_arena_pipeline.py`` (two optimizer steps each) are the
models; the attribute network is its tiny recipe. These tests check the mechanics (pairing,
provenance, errors), not whether enhancement helps: that is measured on trained studies
(bench/BENCHMARKS.md, "Prompt enhancement").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import trainers.domain as domain
from harness.arena_pipeline import (
    ArenaError,
    add_run_contestants,
    embedded_prompts,
    render_contestants,
    renders,
)
from harness.cli import app
from harness.prompt_following import (
    PromptMeasureError,
    expand_runs,
    measure,
    parse_enhancer,
    prompt_set,
)
from harness.store import Store
from harness.voting import enhanced_prompts
from tests.harness.test_arena_pipeline import Runs, _tiny_net_loader, new_store, runs  # noqa: F401
from trainers.config import EnhancerConfig
from trainers.data.terse import named_accuracy

SHAPES = EnhancerConfig(backend="shapes")


@pytest.fixture(autouse=True)
def tiny_attribute_net(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domain, "load_attribute_net", _tiny_net_loader(domain.load_attribute_net))


def test_named_accuracy_scores_only_the_named_attributes():
    labels = np.array([[0, 1, -1, -1, -1], [2, -1, -1, -1, 1], [0, 0, 0, 0, 0]])
    predicted = np.array([[0, 2, 1, 1, 1], [2, 0, 0, 0, 1], [0, 0, 0, 0, 1]])
    frac, all_ok = named_accuracy(predicted, labels)
    np.testing.assert_allclose(frac, [0.5, 1.0, 0.8])
    assert all_ok.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="at least one attribute"):
        named_accuracy(predicted[:1], np.full((1, 5), -1))


def test_prompt_sets_name_what_they_ask_for():
    terse = prompt_set("terse")
    full = prompt_set("full", num_full=10)
    assert len(terse) >= 50 and len(full) == 10
    assert all(1 <= sum(x >= 0 for x in p.labels) <= 3 for p in terse)
    assert all(min(p.labels) >= 0 for p in full)
    assert {p.category for p in full} == {"seen", "heldout"}
    with pytest.raises(PromptMeasureError, match="terse, full"):
        prompt_set("tersse")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shape", "did you mean 'shapes'"),
        ("shapes:foo", "takes no argument"),
        ("transformers", "path is required"),
    ],
)
def test_bad_enhancer_spec_is_a_clear_error(spec: str, message: str):
    with pytest.raises(PromptMeasureError, match=message):
        parse_enhancer(spec)


def test_enhancer_spec_parses():
    assert parse_enhancer("shapes") == SHAPES
    assert parse_enhancer("openai:gpt-x").model == "gpt-x"
    assert parse_enhancer("transformers:/m/rewriter").path == "/m/rewriter"


def test_trials_expand_to_their_seed_runs(tmp_path: Path, runs: Runs):  # noqa: F811
    store = Store(tmp_path / "harness.duckdb")
    for k, run_dir in enumerate(runs.dirs.values()):
        store.ingest_run_dir(f"st/0000/s{k}", run_dir)
    store.ingest_run_dir("st/0001/s0", runs.dirs["tiny/0"])
    assert expand_runs(store, ["st/0000"]) == ["st/0000/s0", "st/0000/s1"]
    assert expand_runs(store, ["st/0001/s0", "st/0000/s1"]) == ["st/0001/s0", "st/0000/s1"]
    with pytest.raises(PromptMeasureError, match="unknown run or trial 'st/0002'"):
        expand_runs(store, ["st/0002"])


def test_measure_pairs_conditions_and_stores_provenance(tmp_path: Path, runs: Runs):  # noqa: F811
    store = new_store(tmp_path, runs)
    results, comparisons, prov = measure(
        store, ["tiny/0", "tiny/1"], SHAPES, seeds=[0], steps=1, guidance=1.0
    )
    assert prov["backend"] == "shapes" and prov["version"]
    by_set = {c.prompt_set: c for c in comparisons}
    # The shapes enhancer returns a canonical caption unchanged: on full captions both
    # conditions are the same images, so the difference is exactly 0 on every seed.
    assert by_set["full"].rewritten == 0.0
    assert by_set["full"].estimate == 0.0 and by_set["full"].n_seeds == 2
    assert by_set["full"].verdict.startswith("no change")
    diffs = [r.rows[("terse", c)].mean() for r in results for c in ("enhanced", "as_written")]
    assert by_set["terse"].per_seed == pytest.approx([diffs[0] - diffs[1], diffs[2] - diffs[3]])
    for r in results:
        np.testing.assert_array_equal(r.rows[("full", "enhanced")], r.rows[("full", "as_written")])
    # Terse prompts are rewritten into captions naming all five attributes.
    assert by_set["terse"].rewritten > 0.9
    terse = results[0]
    assert all(len(e.split()) >= 8 for e in terse.enhanced["terse"])
    assert np.isfinite(by_set["terse"].ci_low) and by_set["terse"].verdict
    rows = store.query(
        "SELECT target, metric, value, num_images, provenance FROM scores "
        "WHERE metric LIKE 'prompt_following%' ORDER BY target, metric"
    )
    assert len(rows) == 2 * 2 * 2 * 2  # runs x sets x conditions x (fraction, all named)
    enhancers = {
        json.dumps(json.loads(r["provenance"])["prompt_enhancer"], sort_keys=True) for r in rows
    }
    assert enhancers == {"null", json.dumps(prov, sort_keys=True)}
    for r in rows:
        p = json.loads(r["provenance"])
        assert p["steps"] == 1 and p["seeds"] == [0] and p["prompt_set"]["hash"]
    # Measuring again the same way replaces the values instead of adding rows.
    measure(store, ["tiny/0", "tiny/1"], SHAPES, sets=["full"], seeds=[0], steps=1, guidance=1.0)
    assert len(store.query("SELECT * FROM scores WHERE metric LIKE 'prompt_following%'")) == 16


def test_one_seed_is_an_anecdote(tmp_path: Path, runs: Runs):  # noqa: F811
    store = new_store(tmp_path, runs)
    _, comparisons, _ = measure(store, ["tiny/0"], SHAPES, sets=["terse"], seeds=[0], steps=1)
    assert comparisons[0].n_seeds == 1
    assert np.isnan(comparisons[0].ci_low)
    assert "anecdote" in comparisons[0].verdict


def test_measure_refuses_bad_input_before_rendering(tmp_path: Path, runs: Runs):  # noqa: F811
    store = new_store(tmp_path, runs)
    with pytest.raises(PromptMeasureError, match="unknown prompt set"):
        measure(store, ["tiny/0"], SHAPES, sets=["nope"])
    with pytest.raises(PromptMeasureError, match="--seeds"):
        measure(store, ["tiny/0"], SHAPES, seeds=[0, 0])
    with pytest.raises(PromptMeasureError, match="HARNESS_ENHANCER_BASE_URL"):
        measure(store, ["tiny/0"], EnhancerConfig(backend="openai"))
    assert store.query("SELECT count(*) AS n FROM scores")[0]["n"] == 0


def test_cli_measure_json(tmp_path: Path, runs: Runs):  # noqa: F811
    new_store(tmp_path, runs).close()
    cli = CliRunner()
    args = ["prompts", "measure", "tiny/0", "tiny/1", "--sets", "full", "--seeds", "1"]
    args += ["--steps", "1", "--json", "--workdir", str(tmp_path)]
    out = cli.invoke(app, args)
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["prompt_enhancer"]["backend"] == "shapes"
    assert [c["prompt_set"] for c in data["comparisons"]] == ["full"]
    bad = cli.invoke(
        app, ["prompts", "measure", "tiny/0", "--enhancer", "gpt", "--workdir", str(tmp_path)]
    )
    assert bad.exit_code == 2 and "--enhancer 'gpt'" in bad.output


# -- the arena -------------------------------------------------------------------------------------
def test_enhanced_contestant_renders_keep_both_prompts(tmp_path: Path, runs: Runs):  # noqa: F811
    store = new_store(tmp_path, runs)
    plain = add_run_contestants(store, ["tiny/0"], steps=[1])[0]
    enhanced = add_run_contestants(store, ["tiny/0"], steps=[1], enhancer=SHAPES)[0]
    assert enhanced.contestant_id.startswith(plain.contestant_id + "+shapes@")
    row = {c["contestant_id"]: c for c in store.contestants()}[enhanced.contestant_id]
    prov = row["extra"]["prompt_enhancer"]["provenance"]
    assert prov["backend"] == "shapes"
    prompts = embedded_prompts(2)
    terse = [type(prompts[0])(7, "red ball", None)]
    render_contestants(store, tmp_path, [*prompts, *terse], [0], progress=False)
    got = {(r["contestant_id"], r["prompt_id"]): r for r in renders(store)}
    for p in [*prompts, *terse]:
        assert got[(plain.contestant_id, p.prompt_id)]["prompt"] == p.prompt
        assert got[(enhanced.contestant_id, p.prompt_id)]["prompt"] == p.prompt
        assert "enhanced_prompt" not in (got[(plain.contestant_id, p.prompt_id)]["extra"] or {})
        extra = got[(enhanced.contestant_id, p.prompt_id)]["extra"]
        assert extra["prompt_enhancer"] == prov
    # A canonical caption comes back unchanged: the same text and noise give the same image.
    same = got[(enhanced.contestant_id, prompts[0].prompt_id)]
    assert same["extra"]["enhanced_prompt"] == prompts[0].prompt
    assert same["sha256"] == got[(plain.contestant_id, prompts[0].prompt_id)]["sha256"]
    rewritten = got[(enhanced.contestant_id, 7)]["extra"]["enhanced_prompt"]
    assert "red" in rewritten and "circle" in rewritten
    # The app shows the rewritten prompt for the enhanced side only.
    sides = (plain.contestant_id, enhanced.contestant_id)
    assert enhanced_prompts(store, sides, 7, 0) == {enhanced.contestant_id: rewritten}


def test_enhancer_that_changed_since_registration_is_refused(
    tmp_path: Path,
    runs: Runs,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
):
    store = new_store(tmp_path, runs)
    added = add_run_contestants(store, ["tiny/0"], steps=[1], enhancer=SHAPES)[0]
    import trainers.enhance as enhance

    real = enhance.build_enhancer

    def changed(cfg):
        e = real(cfg)
        prov = e.provenance() | {"version": "0000dead"}
        monkeypatch.setattr(e, "provenance", lambda: prov)
        return e

    monkeypatch.setattr(enhance, "build_enhancer", changed)
    with pytest.raises(ArenaError, match="register it again"):
        render_contestants(store, tmp_path, embedded_prompts(1), [0], progress=False)
    assert not renders(store, added.contestant_id)


def test_terse_prompts_for_the_arena():
    from harness.arena_pipeline import load_prompts
    from trainers.data.terse import terse_prompts

    got = load_prompts("terse", None)
    assert [p.prompt for p in got] == [p.prompt for p in terse_prompts()]
    assert {p.category for p in got} == {"terse-seen", "terse-heldout"}
    assert len({p.prompt_id for p in got}) == len(got)
    assert load_prompts("terse", 5) == got[:5]
    with pytest.raises(ArenaError, match="did you mean 'terse'"):
        load_prompts("terce", None)
