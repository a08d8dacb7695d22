"""The arena pipeline offline: contestants, paired rendering, judging rounds, agreement, CLI.

Two tiny runs are trained once for the module by the real trainer, in this process (two
optimizer steps each, 16 px, micro backbone), and registered in the store like a study's
runs; every test that needs runs registers them in its own store file. The trainer's final
domain evaluation is skipped (it is most of a two-step run's time and nothing here reads it).
The domain judge in the CLI test uses a tiny attribute-net recipe (trains in about a second):
these tests check the pipeline's mechanics, not the judge's accuracy (that is
tests/evaluators/test_domain_judge.py).
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import trainers.domain as domain
import trainers.export as export
import trainers.sampling as sampling
from evaluators.judging import PairItem, Verdict
from harness.arena_pipeline import (
    ArenaError,
    ArenaPrompt,
    add_run_contestants,
    build_judge,
    contestant_id,
    embedded_prompts,
    file_prompts,
    judge_agreement,
    judge_round,
    parse_int_list,
    plan_pairs,
    render_contestants,
    renders,
    underpowered_pairs,
)
from harness.cli import app
from harness.store import Store
from tests.trainers.trainer_utils import config, write_config
from trainers.domain import AttributeNetRecipe

TINY_NET = AttributeNetRecipe(
    train_mix=((32, 256),), epochs=1, batch_size=64, eval_size=64, min_accuracy=0.0
)


def _tiny_net_loader(original):
    def load(cache_dir=None, device="cpu", *, recipe=None):
        return original(cache_dir, device, recipe=TINY_NET)

    return load


@dataclass(frozen=True)
class Runs:
    root: Path
    dirs: dict[str, Path]  # run id -> run directory


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two tiny trained runs (seeds 0 and 1), trained in-process by trainers.train.main."""
    from trainers.train import FlowTrainer, main

    root = tmp_path_factory.mktemp("arena-runs")
    cfg = config(
        data={"size": 16},
        train={"steps": 2, "log_every": 1, "checkpoint_every": 100, "warmup_steps": 1},
        eval={"num_images": 2, "reference_images": 4, "loss_images": 0, "steps": 1},
        sample={"num_prompts": 1, "seeds": [0], "steps": 1},
    )
    dirs = {}
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HARNESS_CAPTURED", "1")  # no tee of this process's stdout into the run dir
        # The final domain evaluation (attribute net over padded chunks of 128 images) is most
        # of a 2-step run's time and nothing here reads its metrics.
        mp.setattr(FlowTrainer, "evaluate", lambda self: {})
        try:
            for seed in (0, 1):
                run_dir = root / f"run{seed}"
                path = write_config(root / f"run{seed}.json", {**cfg, "seed": seed})
                assert (
                    main(["--config", str(path), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
                )
                dirs[f"tiny/{seed}"] = run_dir
        finally:
            for s, h in handlers.items():  # main() installs its own SIGINT/SIGTERM handlers
                signal.signal(s, h)
    return Runs(root, dirs)


def new_store(workdir: Path, runs: Runs) -> Store:
    store = Store(workdir / "harness.duckdb")
    for run_id, run_dir in runs.dirs.items():
        store.ingest_run_dir(run_id, run_dir)
    return store


def png(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path))


# -- contestants ---------------------------------------------------------------------------------
def test_contestants_are_one_per_run_and_setting_with_readable_ids(tmp_path: Path, runs: Runs):
    store = new_store(tmp_path, runs)
    added = add_run_contestants(store, ["tiny/0", "tiny/1"], steps=[1, 3], guidance=2.5, label="T")
    ids = [c.contestant_id for c in added]
    assert ids == [
        "tiny/0@euler-1-cfg2.5",
        "tiny/0@euler-3-cfg2.5",
        "tiny/1@euler-1-cfg2.5",
        "tiny/1@euler-3-cfg2.5",
    ]
    assert all(c.created for c in added)
    rows = {c["contestant_id"]: c for c in store.contestants()}
    shift = json.loads((runs.dirs["tiny/0"] / "final" / "harness.json").read_text())["shift"]
    c = rows["tiny/0@euler-3-cfg2.5"]
    assert (c["run_id"], c["solver"], c["steps"], c["guidance"], c["shift"]) == (
        "tiny/0", "euler", 3, 2.5, shift
    )  # fmt: skip
    assert c["label"] == "T tiny/0 euler-3"
    again = add_run_contestants(store, ["tiny/0"], steps=[1], guidance=2.5)
    assert [(a.contestant_id, a.created) for a in again] == [("tiny/0@euler-1-cfg2.5", False)]
    assert contestant_id("s/0001", "heun", 8, 3.0) == "s/0001@heun-8-cfg3"


def test_contestant_errors_name_the_problem_and_the_fix(tmp_path: Path, runs: Runs):
    store = new_store(tmp_path, runs)
    with pytest.raises(ArenaError, match=r"unknown run 'tiny/0x' \(did you mean 'tiny/0'\?\)"):
        add_run_contestants(store, ["tiny/0x"], steps=[2])
    with pytest.raises(ArenaError, match=r"'eulr' is not one of euler, heun \(did you mean"):
        add_run_contestants(store, ["tiny/0"], steps=[2], solver="eulr")
    with pytest.raises(ArenaError, match="'x' in '8,x' is not a whole number"):
        parse_int_list("8,x", "--steps")
    # A registered run without an export: nothing is registered, the message says why.
    bare = tmp_path / "bare"
    (bare / "samples").mkdir(parents=True)
    (bare / "config.json").write_text(json.dumps({"seed": 0, "config_hash": "abc"}))
    store.ingest_run_dir("tiny/bare", bare)
    with pytest.raises(ArenaError, match=r"no exported model: .*final/harness.json does not"):
        add_run_contestants(store, ["tiny/0", "tiny/bare"], steps=[2])
    assert store.contestants() == []


# -- rendering -----------------------------------------------------------------------------------
def test_renders_are_paired_from_the_seed_noise_and_resumable(
    tmp_path: Path, runs: Runs, monkeypatch: pytest.MonkeyPatch
):
    store = new_store(tmp_path, runs)
    a, b = (c.contestant_id for c in add_run_contestants(store, ["tiny/0", "tiny/1"], steps=[2]))
    prompts = embedded_prompts(2)
    assert [p.category for p in prompts] == ["seen", "heldout"]
    calls: list[tuple[list[int], torch.Tensor]] = []
    real_noise = sampling.initial_noise

    def spy(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        noise = real_noise(seeds, shape)
        calls.append((list(seeds), noise))
        return noise

    monkeypatch.setattr(sampling, "initial_noise", spy)
    summary = render_contestants(store, tmp_path, prompts, [0, 1], progress=False)
    assert (summary.rendered, summary.skipped, summary.contestants) == (8, 0, 2)
    rows = renders(store)
    by = {(r["contestant_id"], r["prompt_id"], r["seed"]): r for r in rows}
    assert len(by) == 8
    for pid in (0, 1):
        for seed in (0, 1):
            ra, rb = by[(a, pid, seed)], by[(b, pid, seed)]
            assert ra["prompt"] == rb["prompt"] == prompts[pid].prompt
            assert ra["category"] == prompts[pid].category
            assert Path(ra["path"]).is_file() and Path(ra["path"]).parent != Path(rb["path"]).parent
            assert hashlib.sha256(Path(ra["path"]).read_bytes()).hexdigest() == ra["sha256"]
    # Both contestants drew their noise from the same seeds, and that noise is N(0, 1) from a
    # generator seeded with the seed alone (an independent reimplementation of the draw).
    assert [s for s, _ in calls] == [[0, 1, 0, 1]] * 2
    shape = tuple(calls[0][1].shape[1:])
    for seeds, noise in calls:
        for k, s in enumerate(seeds):
            expected = torch.randn(shape, generator=torch.Generator().manual_seed(s))
            assert torch.equal(noise[k], expected)
    # The PNG is exactly what the sampler makes from that noise with the contestant's setting.
    model = export.load_export(runs.dirs["tiny/1"] / "final")
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))[None]
    from trainers.data.shapes import to_uint8
    from trainers.sampling import sample

    x = sample(
        model.denoiser,
        noise,
        model.text_encoder([prompts[1].prompt]),
        model.text_encoder([""]),
        steps=2,
        shift=model.shift,
        solver="euler",
        guidance=3.0,
    )
    assert np.array_equal(
        png(by[(b, 1, 1)]["path"]), to_uint8(x.clamp(-1, 1))[0].permute(1, 2, 0).numpy()
    )
    # Rerun: nothing to do. Lose one render (row and file): only it is redone, byte-identical.
    again = render_contestants(store, tmp_path, prompts, [0, 1], progress=False)
    assert (again.rendered, again.skipped) == (0, 8)
    lost = by[(a, 1, 0)]
    Path(lost["path"]).unlink()
    with store.transaction() as con:
        con.execute("DELETE FROM renders WHERE contestant_id = ? AND prompt_id = 1", [a])
    redo = render_contestants(store, tmp_path, prompts, [0, 1], progress=False)
    assert (redo.rendered, redo.skipped) == (2, 6)
    assert hashlib.sha256(Path(lost["path"]).read_bytes()).hexdigest() == lost["sha256"]
    # A prompt set that gives a rendered id another text is refused.
    other = [ArenaPrompt(0, "a small red circle in the center on a black background", None)]
    with pytest.raises(ArenaError, match="prompt id 0 was rendered for"):
        render_contestants(store, tmp_path, other, [0], progress=False)


def test_file_prompts(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\na cat\n\na dog\na cat\n")
    ps = file_prompts(f)
    assert [p.prompt for p in ps] == ["a cat", "a dog"]
    assert ps[0].prompt_id == file_prompts(tmp_path / "p.txt", 1)[0].prompt_id
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ArenaError, match="has no prompts"):
        file_prompts(tmp_path / "empty.txt")


# -- judging rounds ------------------------------------------------------------------------------
class FavouriteJudge:
    """Prefers one contestant, says tie otherwise; no verdict for prompts containing 'square'."""

    kind = "judge"

    def __init__(self, favourite: str, interrupt_after: int | None = None) -> None:
        self.rater_id = "judge:fake:v1"
        self.favourite = favourite
        self.calls = 0
        self.interrupt_after = interrupt_after

    def judge_pairs(self, items: Sequence[PairItem]) -> list[Verdict]:
        self.calls += 1
        if self.interrupt_after is not None and self.calls > self.interrupt_after:
            raise KeyboardInterrupt
        out = []
        for it in items:
            assert it.left_image.is_file() and it.right_image.is_file()
            if "square" in it.prompt:
                out.append(Verdict(None, {"error": "could not parse"}))
            elif self.favourite in (it.left_id, it.right_id):
                side = "left" if it.left_id == self.favourite else "right"
                out.append(Verdict(side, {"why": "favourite", "swap_consistent": True}))
            else:
                out.append(Verdict("tie", {}))
        return out


@pytest.fixture(scope="module")
def rendered(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work dir with 2 contestants rendered on 4 prompts x 1 seed (copied per test)."""
    work = tmp_path_factory.mktemp("rendered")
    store = new_store(work, runs)
    add_run_contestants(store, ["tiny/0", "tiny/1"], steps=[1])
    render_contestants(store, work, embedded_prompts(4), [0], progress=False)
    return work


def copy_store(rendered: Path, tmp_path: Path) -> Store:
    (tmp_path / "harness.duckdb").write_bytes((rendered / "harness.duckdb").read_bytes())
    return Store(tmp_path / "harness.duckdb")


def test_judge_round_stores_verdicts_then_swaps_sides(rendered: Path, tmp_path: Path):
    store = copy_store(rendered, tmp_path)
    a, _ = sorted(c["contestant_id"] for c in store.contestants())
    prompts = {r["prompt"] for r in renders(store)}
    undecidable = sum("square" in p for p in prompts)
    assert undecidable == 1  # embedded prompt 3 is a square: the fake judge has no verdict
    judge = FavouriteJudge(a)
    first = judge_round(store, judge, 4, batch_size=3, progress=False)
    # Four pairs (only one pair of contestants exists), four different items.
    assert first.asked == 4 and first.no_verdict == undecidable
    assert first.stored == 4 - undecidable == sum(first.outcomes.values())
    assert set(first.outcomes) <= {"left", "right"}
    assert first.no_verdict_reasons == ({"could not parse": undecidable} if undecidable else {})
    votes = store.comparisons()
    assert len(votes) == first.stored
    paths = {(r["contestant_id"], r["prompt"], r["seed"]): r["path"] for r in renders(store)}
    for v in votes:
        assert v["rater_id"] == "judge:fake:v1" and v["rater_kind"] == "judge"
        assert v["left_image"] == paths[(v["left_id"], v["prompt"], v["seed"])]
        assert v["right_image"] == paths[(v["right_id"], v["prompt"], v["seed"])]
        winner = v["left_id"] if v["outcome"] == "left" else v["right_id"]
        assert winner == a and v["extra"]["verdict"]["why"] == "favourite"
    assert len({(v["prompt"], v["seed"]) for v in votes}) == len(votes)
    assert {r["rater_id"]: r["kind"] for r in store.raters()} == {"judge:fake:v1": "judge"}
    # Second round: every item was judged once, so each comes back in the other order.
    items, skipped = plan_pairs(store, judge.rater_id, 4)
    assert not skipped and len(items) == 4
    shown = {(v["prompt"], v["seed"]): (v["left_id"], v["right_id"]) for v in votes}
    for it in items:
        if (it.prompt, it.seed) in shown:
            assert (it.left_id, it.right_id) == shown[(it.prompt, it.seed)][::-1]
    judge_round(store, judge, 4, progress=False)
    # Only one pair and 4 items: asking for 6 leaves the pair out twice, saying why.
    items, skipped = plan_pairs(store, judge.rater_id, 6)
    assert len(items) == 4 and len(skipped) == 2
    assert skipped[0][2] == "all its items are already in this round"
    (row,) = judge_agreement(store)
    n = 4 - undecidable
    # Pairs from comparisons in both orders (n) plus the verdicts that report it themselves.
    assert row["swap_pairs"] == n + 2 * n and row["swap_consistency"] == 1.0
    assert row["human_pairs"] == 0 and row["agreement"] is None


def test_judge_round_keeps_what_was_stored_on_ctrl_c(rendered: Path, tmp_path: Path):
    store = copy_store(rendered, tmp_path)
    a = sorted(c["contestant_id"] for c in store.contestants())[0]
    summary = judge_round(store, FavouriteJudge(a, interrupt_after=1), 4, batch_size=2,
                          progress=False)  # fmt: skip
    assert summary.interrupted and summary.asked == 2
    assert len(store.comparisons()) == summary.stored


def test_judge_errors(tmp_path: Path, rendered: Path, runs: Runs):
    store = new_store(tmp_path, runs)
    add_run_contestants(store, ["tiny/0", "tiny/1"], steps=[1])
    with pytest.raises(ArenaError, match="no renders yet"):
        plan_pairs(store, "domain", 3)
    with pytest.raises(ArenaError, match=r"unknown judge 'domian' \(did you mean 'domain'\?\)"):
        build_judge("domian", store)


# -- agreement -----------------------------------------------------------------------------------
def vote(left, right, outcome, rater, kind, t, prompt="p", seed=0, **extra):
    return {"prompt": prompt, "seed": seed, "left_id": left, "right_id": right,
            "outcome": outcome, "rater_id": rater, "rater_kind": kind, "time": t,
            **({"extra": extra} if extra else {})}  # fmt: skip


def test_agreement_against_hand_counts():
    store = Store(":memory:")
    for c in "AB":
        store.add_contestant(c)
    store.add_comparisons(
        [
            # item p/0: the judge says A in both orders; humans say A, A (sides swapped), tie.
            vote("A", "B", "left", "J", "judge", 1),
            vote("B", "A", "right", "J", "judge", 2),
            vote("A", "B", "left", "ann", "human", 3),
            vote("B", "A", "right", "bob", "human", 4),
            vote("A", "B", "tie", "cy", "human", 5),
            # item p/1: the judge says both_bad, a human says tie: a match (no preference);
            # in the other order the judge says B: a swap inconsistency.
            vote("A", "B", "both_bad", "J", "judge", 6, seed=1),
            vote("B", "A", "left", "J", "judge", 7, seed=1),
            vote("A", "B", "tie", "ann", "human", 8, seed=1),
            # item q/0: the judge says B, the human A (a decisive disagreement).
            vote("A", "B", "right", "J", "judge", 9, prompt="q"),
            vote("A", "B", "left", "ann", "human", 10, prompt="q"),
            # an MLLM-style verdict that asked both orders and got different answers (a tie)
            vote(
                "A",
                "B",
                "tie",
                "J",
                "judge",
                12,
                prompt="r",
                verdict={"answers": [{"outcome": "left"}, {"outcome": "right"}], "agree": False},
            ),
            # a gold vote is not a human opinion to agree with
            vote("A", "B", "right", "ann", "human", 11, prompt="q", gold=True),
        ]
    )
    (row,) = judge_agreement(store)
    # p/0: 2 judge verdicts x 3 human votes = 6 couples, 4 agree (A/A twice each), 2 vs tie.
    # p/1: 2 verdicts x 1 vote: both_bad~tie agrees, B vs tie does not. q/0: 1 couple, no.
    assert (row["human_pairs"], row["agree"]) == (9, 5)
    # Decisive couples: p/0 4 (all agree), p/1 none, q/0 1 (disagree).
    assert (row["decisive_pairs"], row["decisive_agree"]) == (5, 4)
    # Both orders stored: p/0 consistent, p/1 not; r/0 reports its own disagreeing orders.
    assert (row["swap_pairs"], row["swap_consistent"]) == (3, 1)
    assert row["agreement"] == pytest.approx(5 / 9) and row["judged_items"] == 4


def test_underpowered_pairs_flag_the_weak_neighbours():
    store = Store(":memory:")
    for c in "ABC":
        store.add_contestant(c)
    rows = [vote("A", "B", "left", "h", "human", t, seed=t) for t in range(30)]
    rows += [vote("B", "C", "right" if t == 0 else "left", "h", "human", 100 + t) for t in range(4)]
    store.add_comparisons(rows)
    pairs = underpowered_pairs(store, rounds=200)
    assert [(p["a"], p["b"], p["battles"]) for p in pairs] == [("A", "B", 30), ("B", "C", 4)]
    assert not pairs[0]["underpowered"] and pairs[0]["lower"] > 0  # 30 wins in 30 battles
    assert pairs[1]["underpowered"] and "only 4 direct battles" in pairs[1]["reason"]


# -- the command line, end to end ----------------------------------------------------------------
@pytest.mark.slow
def test_cli_end_to_end_offline(tmp_path: Path, runs: Runs, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(domain, "load_attribute_net", _tiny_net_loader(domain.load_attribute_net))
    work = tmp_path / "work"
    new_store(work, runs)
    cli = CliRunner()

    def ok(*args: str) -> str:
        res = cli.invoke(app, [*args, "--workdir", str(work)])
        assert res.exit_code == 0, res.output
        return res.output

    def fails(*args: str) -> str:
        res = cli.invoke(app, [*args, "--workdir", str(work)])
        assert res.exit_code == 2, res.output
        return res.output

    assert "unknown run 'tiny/9'" in fails("arena", "add", "tiny/9", "--steps", "2")
    assert "no renders yet" in fails("judge", "--judge", "domain")
    out = ok("arena", "add", "tiny/0", "tiny/1", "--steps", "1,2", "--guidance", "2")
    assert out.count("added") == 4 and "tiny/1@euler-2-cfg2: added" in out
    assert "no renders yet" in fails("judge", "--judge", "domain")
    assert "did you mean 'domain'" in fails("judge", "--judge", "domian")
    out = ok("arena", "render", "--num-prompts", "2", "--seeds", "2")
    assert "4 contestants x 2 prompts x 2 seeds: 16 rendered, 0 already there" in out
    assert "0 rendered, 16 already there" in ok(
        "arena", "render", "--num-prompts", "2", "--seeds", "2"
    )
    out = ok("judge", "--judge", "domain", "--pairs", "12")
    assert "12 comparisons stored" in out and "0 without a verdict" in out
    board = json.loads(ok("leaderboard", "--json", "--rater-kind", "domain", "--rounds", "50"))
    assert {r["contestant"] for r in board} <= {
        f"tiny/{s}@euler-{n}-cfg2" for s in (0, 1) for n in (1, 2)
    } and len(board) >= 2
    assert sum(r["battles"] for r in board) == 24
    table = ok("leaderboard", "--rounds", "50")
    assert "Arena leaderboard" in table and "underpowered:" in table  # 12 votes prove little
    agreement = json.loads(ok("arena", "agreement", "--json"))
    assert [r["kind"] for r in agreement] == ["domain"]
    assert agreement[0]["rater_id"].startswith("domain:")
