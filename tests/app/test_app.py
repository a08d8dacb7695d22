"""Every page of the app through Streamlit's AppTest on the fixture arena: what it shows, and
that votes cast on the rating page land in the store exactly once, can be undone, need a valid
token, and move the leaderboard."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

MAIN = Path(__file__).resolve().parents[2] / "app" / "main.py"


def _app(page: str | None = None, token: str | None = None) -> AppTest:
    at = AppTest.from_file(str(MAIN), default_timeout=60)
    if token is not None:
        at.query_params["token"] = token
    at.run()
    if page is not None:
        at.switch_page(page)
        at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _human_votes(arena) -> list[dict]:
    return arena.store.query(
        "SELECT * FROM comparisons WHERE rater_kind = 'human' ORDER BY time, comparison_id"
    )


def _table(at: AppTest, index: int = 0) -> list[dict]:
    return at.dataframe[index].value.to_dict("records")


def _shown_pngs(at: AppTest) -> list[bytes]:
    """The bytes of every data-URI image the page sent (the rating page's images)."""
    uris = re.findall(
        r"data:image/png;base64,([A-Za-z0-9+/=]+)", " ".join(m.value for m in at.markdown)
    )
    return [base64.b64decode(u) for u in uris]


def _image_captions(at: AppTest) -> list[str]:
    return [c for image in at.image for c in image.captions]


def _progress(at: AppTest) -> str:
    return at.get("progress")[0].proto.text


def _vote_buttons(at: AppTest) -> list:
    return [b for b in at.button if (b.key or "").startswith("vote_")]


def test_leaderboard_shows_ratings_matrix_provenance_and_reliability(arena) -> None:
    at = _app()
    rows = _table(at)
    assert [r["contestant"] for r in rows] == ["c-good", "c-mid", "c-bad"]
    # Win rate by hand from the fixture's 5 domain votes (ties count half): c-good won 3 and
    # tied 1 of 4; c-mid won 1, lost 1 and tied 1 of 3; c-bad lost all 3.
    assert [r["win rate"] for r in rows] == pytest.approx([3.5 / 4, 1.5 / 3, 0.0])
    assert [r["votes"] for r in rows] == [4, 3, 3]
    assert len(at.get("plotly_chart")) == 1  # the win-rate matrix
    assert any(h.value == "c-good (C-GOOD)" for h in at.subheader)  # the top row's details
    provenance = {r["provenance"]: r["value"] for r in at.table[0].value.to_dict("records")}
    assert provenance["run"] == "toy/0" and provenance["config hash"] == "hash0"
    assert provenance["sampler"] == "euler" and provenance["steps"] == "8"
    # The public page never shows the renders raters judge blind (they would identify sides).
    assert len(at.image) == 0 and _shown_pngs(at) == []
    assert any("4 renders in the arena rotation (not shown" in c.value for c in at.caption)
    raters = _table(at, 2)  # after the effect table
    assert raters[0]["rater"] == "ana-lima" and raters[0]["gold pairs"] == 0


def test_leaderboard_shows_robustness_and_the_effect_of_a_training_choice(arena) -> None:
    """Beside the ratings: provisional contestants are marked and the votes that flip the top
    are counted (the same rows as `harness leaderboard`); below, the effect of the trials'
    searched parameter on win odds, as `harness leaderboard --by` computes it."""
    from harness.arena_effects import choice_effects

    at = _app()
    rows = _table(at)
    assert [r["provisional"] for r in rows] == [True, True, True]  # fewer than 20 votes each
    assert any("changes the top" in c.value and "upper bound" in c.value for c in at.caption)
    assert at.selectbox(key="lb_effect_param").value == "timesteps.sampler"
    effects = _table(at, 1)
    expected = choice_effects(arena.store, "timesteps.sampler").to_json()
    assert [e["value"] for e in effects] == [r["name"] for r in expected["rows"]]
    assert [e["verdict"] for e in effects] == [r["verdict"] for r in expected["rows"]]
    assert any("Contextual Bradley-Terry over 5 votes" in c.value for c in at.caption)


def test_leaderboard_filters(arena) -> None:
    at = _app()
    at.selectbox(key="lb_cat").set_value("heldout").run()
    # Votes 2 and 3 (k % 4 in {2, 3}) are on held-out prompts: c-bad vs c-good, c-good vs c-bad.
    assert sorted(r["contestant"] for r in _table(at)) == ["c-bad", "c-good"]
    at.selectbox(key="lb_cat").set_value("all").run()
    at.selectbox(key="lb_kind").set_value("human").run()
    assert any("No votes match" in i.value for i in at.info)


def test_rating_page_without_a_valid_token_cannot_vote(arena) -> None:
    # The last character changed (a token that ends in "x" must not get an "x" back: it did
    # once in 62 runs, and the "wrong" token was the right one).
    wrong = arena.token[:-1] + ("y" if arena.token.endswith("x") else "x")
    for token in (None, "not-a-token", wrong):
        at = _app("views/rate.py", token=token)
        assert at.error and "harness raters add" in at.error[0].value
        assert not [b for b in at.button if (b.key or "").startswith("vote_")]
    assert _human_votes(arena) == []


def test_a_vote_is_stored_and_moves_the_leaderboard(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    pair = at.session_state["rate_pair"]
    assert [b.label for b in at.button] == ["A is better", "B is better", "Tie", "Both bad", "Undo"]
    assert len(_shown_pngs(at)) == 2
    at.button(key="vote_right").click().run()
    votes = _human_votes(arena)
    assert len(votes) == 1
    v = votes[0]
    assert (v["left_id"], v["right_id"], v["outcome"]) == (pair.left_id, pair.right_id, "right")
    assert (v["rater_id"], v["seed"], v["time"]) == (arena.rater_id, pair.seed, pair.issued_at)
    assert v["session"] == at.session_state["rate_session"]
    assert at.session_state["rate_pair"].nonce != pair.nonce  # the next pair is on screen
    assert "1 of 20 votes" in at.get("progress")[0].proto.text

    at.switch_page("views/leaderboard.py")
    at.run()
    at.selectbox(key="lb_kind").set_value("human").run()
    rows = {r["contestant"]: r for r in _table(at)}
    assert set(rows) == {pair.left_id, pair.right_id}
    assert rows[pair.right_id]["rank"] == 1 and rows[pair.right_id]["win rate"] == 1.0


def test_undo_removes_the_vote_and_shows_the_pair_again(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    first = at.session_state["rate_pair"]
    at.button(key="vote_left").click().run()
    assert len(_human_votes(arena)) == 1
    at.button(key="vote_undo").click().run()
    assert _human_votes(arena) == []
    assert at.session_state["rate_pair"] == first  # same nonce and time: a revote is this vote
    at.button(key="vote_tie").click().run()
    votes = _human_votes(arena)
    assert [(v["outcome"], v["time"]) for v in votes] == [("tie", first.issued_at)]


def test_a_resubmitted_vote_is_stored_once(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    pair = at.session_state["rate_pair"]
    at.button(key="vote_left").click().run()
    # The rerun that moved on to the next pair is lost (a double click interrupts it, the
    # browser resends): the same pair is on screen again and is voted again.
    at.session_state["rate_pair"] = pair
    at.session_state["rate_voted"] = set()
    at.run()
    at.button(key="vote_left").click().run()
    assert len(_human_votes(arena)) == 1
    # A different answer to the same issued pair is refused, not stored as a second vote.
    at.session_state["rate_pair"] = pair
    at.session_state["rate_voted"] = set()
    at.run()
    at.button(key="vote_right").click().run()
    assert [v["outcome"] for v in _human_votes(arena)] == ["left"]
    assert any("not recorded" in w.value for w in at.warning)


def test_gold_pairs_measure_reliability_and_stay_off_the_leaderboard(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 1.0)
    at = _app("views/rate.py", token=arena.token)
    pair = at.session_state["rate_pair"]
    assert "gold:noise" in (pair.left_id, pair.right_id) and pair.gold_expected is not None
    at.button(key=f"vote_{pair.gold_expected}").click().run()
    wrong = at.session_state["rate_pair"]
    at.button(key="vote_tie").click().run()  # a tie against pure noise fails the check
    assert wrong.gold_expected is not None
    votes = _human_votes(arena)
    assert len(votes) == 2
    at.switch_page("views/leaderboard.py")
    at.run()
    raters = _table(at, 2)  # after the effect table
    assert (raters[0]["gold pairs"], raters[0]["gold right"]) == (2, 1)
    assert raters[0]["reliability"] == 0.5 and raters[0]["votes"] == 0
    at.selectbox(key="lb_kind").set_value("human").run()
    assert any("No votes match" in i.value for i in at.info)  # gold votes never rate anyone


def test_study_page_shows_trials_ablation_and_plots(arena) -> None:
    at = _app("views/studies.py")
    trials = _table(at)
    assert [(t["trial"], t["state"]) for t in trials] == [
        (0, "complete"),
        (1, "complete"),
        (2, "failed"),
    ]
    assert trials[2]["error"] == "loss is NaN at step 30"
    md = "\n".join(m.value for m in at.markdown)
    assert "# Study toy" in md and "## Rank table" in md  # harness.report's tables
    assert "**One training seed per configuration**" in md  # the toy study has no repeats
    titles = [h.value for h in at.subheader]
    assert "Objective history" in titles and "Parallel coordinates (domain_fid)" in titles
    assert "Final metrics, one dot per training seed" in titles
    curves = [t.split(" (")[0] for t in titles]
    assert "domain_fid against step" in curves and "train/loss against step" in curves


def test_run_page_shows_status_config_curves_and_samples(arena) -> None:
    at = _app("views/runs.py")
    at.selectbox(key="run_pick").set_value("toy/2").run()
    assert at.error[0].value == "Failed: loss is NaN at step 30"
    assert "FloatingPointError" in at.code[0].value
    assert at.json[0].value and '"sampler": "mode"' in at.json[0].value
    assert [c.proto.spec for c in at.get("plotly_chart")]  # the loss curve
    # Two sample sets across training (a slider picks one) and the final set, 2 images each.
    assert [h.value for h in at.subheader] == [
        "Results",
        "Settings",
        "Samples across training",
        "Final samples",
    ]
    assert len(at.image) == 4
    # Sent as PNG (Streamlit's "auto" would re-encode these opaque PNGs as JPEG, ".jpg").
    assert all(url.endswith(".png") for image in at.image for url in image.value)
    # Final metrics: each metric's last value (fixture: domain_fid = 50 - step + 5 * trial).
    final = {r["metric"]: r for r in _table(at)}
    assert final["domain_fid"]["final value"] == "20" and final["domain_fid"]["at step"] == 40
    assert final["train/loss"]["at step"] == 40
    assert set(_image_captions(at)) >= {
        "a red circle (seed 0, step 40)",
        "a blue circle (seed 0, step 40)",
    }
    at.select_slider(key="run_tag").set_value("step_000020").run()
    assert len(at.image) == 4


def _run_page(run_id: str) -> AppTest:
    """The run page opened by its URL (``?run=ID``)."""
    at = AppTest.from_file(str(MAIN), default_timeout=60)
    at.run()
    at.query_params["run"] = run_id
    at.switch_page("views/runs.py")
    at.run()
    return at


def test_run_page_opens_the_run_named_in_the_url(arena) -> None:
    at = _run_page("toy/1")
    assert at.selectbox(key="run_pick").value == "toy/1"
    assert not at.error


def test_run_page_shows_the_trial_values_of_a_completed_run(arena) -> None:
    at = _run_page("toy/1")
    assert any(c.value == "Trial objective values: 25" for c in at.caption)


def test_run_page_shows_every_sample_with_its_prompt(arena) -> None:
    """A run with more samples per set than one grid row holds: all of them, each captioned
    with its prompt."""
    run = arena.workdir / "runs-extra" / "big"
    prompts = [f"prompt number {k}" for k in range(15)]
    arena.store.register_run("extra/big", run, {"seed": 0}, "hashbig")
    rows = []
    for k, prompt in enumerate(prompts):
        path = run / "samples" / "final" / f"p{k}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (k * 10, 0, 0)).save(path)
        rows.append(("extra/big", f"final/p{k}.png", "final", 10, k, prompt, 0, 8, 3.0, "x"))
    with arena.store.transaction() as con:
        con.executemany(
            "INSERT INTO samples (run_id, path, tag, step, prompt_id, prompt, seed, nfe, cfg, "
            "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    at = _run_page("extra/big")
    assert not at.exception
    assert len(at.image) == 15
    captions = set(_image_captions(at))
    assert all(f"{p} (seed 0, step 10)" in captions for p in prompts)


@pytest.mark.parametrize(
    ("page", "param", "key", "what"),
    [
        ("views/runs.py", "run", "run_pick", "run"),
        ("views/studies.py", "study", "st_study", "study"),
    ],
)
def test_an_unknown_id_in_the_url_says_so_and_shows_nothing_else(
    arena, page: str, param: str, key: str, what: str
) -> None:
    at = AppTest.from_file(str(MAIN), default_timeout=60)
    at.run()
    at.query_params[param] = "no-such-thing"
    at.switch_page(page)
    at.run()
    assert not at.exception
    assert at.error and at.error[0].value.startswith(f"No {what} 'no-such-thing'")
    assert at.selectbox(key=key).value is None  # not silently another run or study
    assert not at.json and not at.dataframe and not at.image


def test_a_missing_render_is_skipped_not_a_crash(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    with arena.store.transaction() as con:
        con.execute("UPDATE renders SET path = path || '.gone'")
    at = _app("views/rate.py", token=arena.token)
    assert any("image is missing" in w.value for w in at.warning)
    assert not [b for b in at.button if b.key in ("vote_left", "vote_right")]


@pytest.mark.parametrize("page", [None, "views/rate.py", "views/studies.py", "views/runs.py"])
def test_a_file_that_is_not_a_store_shows_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, page: str | None
) -> None:
    """harness.duckdb holding garbage: every page says so in one message, no traceback, and
    the file stays as it was."""
    db = tmp_path / "harness.duckdb"
    db.write_bytes(b"this is not a DuckDB file\n" * 50)
    before = db.read_bytes()
    monkeypatch.setenv("HARNESS_WORKDIR", str(tmp_path))
    at = _app(page)
    assert at.error, "no error shown"
    text = " ".join(e.value for e in at.error)
    assert "is not a harness store" in text and str(db) in text
    assert "Traceback" not in text
    assert db.read_bytes() == before
    from streamlit import config

    assert config.get_option("client.showErrorDetails") == "none"  # set by app/main.py


def test_harness_app_listens_locally_and_hides_error_details(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`harness app` starts Streamlit on 127.0.0.1 unless told otherwise, and with
    client.showErrorDetails off, so a page that fails shows no traceback to a rater."""
    from typer.testing import CliRunner

    from harness import cli

    commands: list[list[str]] = []
    monkeypatch.setattr(cli, "_serve", lambda command, env: commands.append(command) or 0)
    for extra, address in (([], "127.0.0.1"), (["--address", "0.0.0.0"], "0.0.0.0")):
        result = CliRunner().invoke(cli.app, ["app", "--workdir", str(tmp_path), *extra])
        assert result.exit_code == 0, result.output
        flags = dict(zip(commands[-1], commands[-1][1:], strict=False))
        assert flags["--server.address"] == address
        assert flags["--client.showErrorDetails"] == "none"


def test_rating_page_sends_the_render_files_pixels_losslessly_in_a_frame(
    arena, monkeypatch
) -> None:
    """The images on the rating page are the render files' own PNG bytes (no JPEG re-encode,
    no resize): decoding what the page sends gives the file's pixels exactly."""
    from harness.voting import render_image

    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    pair = at.session_state["rate_pair"]
    sent = _shown_pngs(at)
    assert len(sent) == 2
    for side, png in zip(pair.sides, sent, strict=True):
        original = render_image(arena.store, side, pair.prompt_id, pair.seed)
        with Image.open(io.BytesIO(png)) as a, Image.open(io.BytesIO(original)) as b:
            assert a.format == "PNG"
            assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
    html = " ".join(m.value for m in at.markdown)
    assert html.count("border: 2px solid #808080") == 2  # the frame around each image


def test_a_session_ends_after_its_goal_and_another_can_start(arena, monkeypatch) -> None:
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    first_session = at.session_state["rate_session"]
    assert _progress(at) == "0 of 20 votes this session"
    for k in range(1, 21):
        at.button(key="vote_left").click().run()
        assert not at.exception
        assert _progress(at) == f"{k} of 20 votes this session"
    assert len(_human_votes(arena)) == 20
    assert any("Session complete: 20 votes" in s.value for s in at.success)
    assert [b.key for b in _vote_buttons(at)] == ["vote_undo"]  # no 21st pair to vote on
    assert _shown_pngs(at) == []
    assert at.metric[0].value == "20"
    at.button(key="vote_undo").click().run()  # the last vote can still be taken back
    assert _progress(at) == "19 of 20 votes this session" and len(_shown_pngs(at)) == 2
    at.button(key="vote_both_bad").click().run()
    assert any("Session complete: 20 votes" in s.value for s in at.success)
    assert [v["outcome"] for v in _human_votes(arena)].count("both_bad") == 1
    at.button(key="rate_new_session").click().run()
    assert _progress(at) == "0 of 20 votes this session"
    assert at.session_state["rate_session"] != first_session
    at.button(key="vote_tie").click().run()
    assert _progress(at) == "1 of 20 votes this session"
    assert len(_human_votes(arena)) == 21


def test_a_token_revoked_mid_session_casts_no_more_votes(arena, monkeypatch) -> None:
    """`harness raters add NAME --new-token` while the old link's page is open: its next
    click records nothing (the vote re-checks the token against the store)."""
    from harness.raters import add_rater

    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    at = _app("views/rate.py", token=arena.token)
    at.button(key="vote_left").click().run()
    assert len(_human_votes(arena)) == 1
    rid, new = add_rater(arena.store, "Ana Lima", rotate=True)
    assert rid == arena.rater_id and new != arena.token
    at.button(key="vote_right").click().run()
    assert len(_human_votes(arena)) == 1
    assert at.error and "not valid" in at.error[0].value
    assert not _vote_buttons(at)


def test_rating_page_shows_the_enhanced_prompt_beside_the_original(arena, monkeypatch) -> None:
    """Renders of a contestant with a prompt enhancer show what the model was given under its
    image; the prompt raters judge against stays the original."""
    monkeypatch.setattr("harness.voting.GOLD_RATE", 0.0)
    with arena.store.transaction() as con:
        con.execute(
            "UPDATE renders SET extra = json_object('enhanced_prompt', 'REWRITTEN ' || prompt) "
            "WHERE contestant_id IN ('c-good', 'c-mid')"
        )
    at = _app("views/rate.py", token=arena.token)
    pair = at.session_state["rate_pair"]
    assert f"**Prompt:** {pair.prompt}" in " ".join(m.value for m in at.markdown)
    shown = [c.value for c in at.caption if "enhanced prompt" in c.value]
    expected = [
        f"enhanced prompt given to the model: REWRITTEN {pair.prompt}"
        for side in pair.sides
        if side in ("c-good", "c-mid")
    ]
    assert shown == expected and expected  # every pair of the three has one such side


def test_run_page_captions_show_the_enhanced_prompt(arena) -> None:
    with arena.store.transaction() as con:
        con.execute(
            "UPDATE samples SET extra = json_object('enhanced_prompt', 'a big red circle') "
            "WHERE run_id = 'toy/0' AND prompt_id = 0"
        )
    at = _run_page("toy/0")
    assert "a red circle -> a big red circle (seed 0, step 40)" in set(_image_captions(at))
