"""Rating page: a person with a personal link judges pairs of anonymised images.

State (``st.session_state``, per browser session): ``rate_session`` (the session id stored
with each vote), ``rate_queue`` (planned pairs), ``rate_pair`` (the pair on screen, issued with
a nonce and its issue time), ``rate_voted`` (nonces already voted on) and ``rate_history``
(votes of this session, newest last, for undo). Votes are cast in button callbacks, which run
before the page is drawn again, and each callback carries the nonce of the pair it was drawn
for: a second click on a pair already voted on, or a click that arrives after the page moved
on, is ignored; and the store itself counts a vote once (:mod:`harness.voting`).

Keys: A (left better), B (right better), T (tie), X (both bad), U (undo): Streamlit's own
button shortcuts (``st.button(shortcut=...)``), active while focus is not in a text field.
"""

from __future__ import annotations

import random
import secrets
from dataclasses import asdict

import streamlit as st

from app import common
from harness.raters import Rater, authenticate
from harness.store import StoreError
from harness.voting import (
    IssuedPair,
    PlannedPair,
    issue,
    plan_pairs,
    record_vote,
    session_summary,
    undo_vote,
)

# Votes per session the progress bar counts towards (a person tires after a few dozen). No
# attribute docstrings in page scripts: Streamlit's "magic" would print them on the page.
SESSION_GOAL = 20
IMAGE_PX = 384  # both images and the buttons fit on a laptop screen
BATCH = 5
BUTTONS = (
    ("left", "A is better", "A"),
    ("right", "B is better", "B"),
    ("tie", "Tie", "T"),
    ("both_bad", "Both bad", "X"),
)


def rater_ui() -> Rater | None:
    """The rater of the link's token, or None (with a message: no voting without a token)."""
    token = st.query_params.get("token") or st.session_state.get("rate_token")
    if token:
        st.session_state["rate_token"] = token  # navigating to other pages drops the URL query
        if st.query_params.get("token") != token:
            st.query_params["token"] = token  # back in the URL, so that a refresh keeps it
    store = common.store()
    if store is None:
        return None
    rater = authenticate(store, token)
    if rater is None:
        what = (
            "This link's token is not valid (revoked or mistyped)."
            if token
            else ("Rating needs a personal link.")
        )
        st.error(
            f"{what} Ask the arena's organiser for a link: `harness raters add YOUR NAME` "
            "prints one (http://HOST:PORT/rate?token=...)."
        )
    return rater


def _state() -> dict:
    ss = st.session_state
    ss.setdefault("rate_session", "app-" + secrets.token_hex(6))
    ss.setdefault("rate_queue", [])
    ss.setdefault("rate_pair", None)
    ss.setdefault("rate_voted", set())
    ss.setdefault("rate_history", [])
    ss.setdefault("rate_rng", random.Random())
    return ss


def current_pair(rater: Rater) -> IssuedPair | None:
    """The pair on screen, issuing the next planned one when there is none."""
    ss = _state()
    if ss["rate_pair"] is None:
        if not ss["rate_queue"]:
            ss["rate_queue"] = plan_pairs(common.store(), rater.rater_id, BATCH, rng=ss["rate_rng"])
        if ss["rate_queue"]:
            ss["rate_pair"] = issue(ss["rate_queue"].pop(0))
    return ss["rate_pair"]


def _vote(outcome: str, nonce: str, rater_id: str) -> None:
    """Button callback: record the vote on the pair with ``nonce`` if it is still on screen."""
    ss = _state()
    pair: IssuedPair | None = ss["rate_pair"]
    if pair is None or pair.nonce != nonce or nonce in ss["rate_voted"]:
        return  # a double click or a stale click: this pair was voted on already
    try:
        result = record_vote(common.store(), pair, outcome, rater_id, ss["rate_session"])
    except StoreError as err:
        ss["rate_error"] = str(err)
        return
    ss["rate_voted"].add(nonce)
    ss["rate_history"].append((result.comparison_id, pair, outcome))
    ss["rate_pair"] = None
    common.clear_after_vote()


def _undo(rater_id: str) -> None:
    """Button callback: delete the last vote of this session and show its pair again."""
    ss = _state()
    if not ss["rate_history"]:
        return
    cid, pair, _ = ss["rate_history"].pop()
    undo_vote(common.store(), cid, rater_id, ss["rate_session"])
    ss["rate_voted"].discard(pair.nonce)
    if ss["rate_pair"] is not None:  # the pair on screen goes back to the front of the queue
        shown = asdict(ss["rate_pair"])
        del shown["nonce"], shown["issued_at"]
        ss["rate_queue"].insert(0, PlannedPair(**shown))
    ss["rate_pair"] = pair  # same nonce and issue time: a new vote gets the same id
    common.clear_after_vote()


def pair_ui(pair: IssuedPair, rater: Rater) -> None:
    """The prompt, the two images (A left, B right) and the vote buttons."""
    db = common.db_path()
    st.markdown(f"**Prompt:** {pair.prompt}")
    st.caption("Which image shows the prompt better? Judge prompt following first, then quality.")
    try:
        pngs = [common.render_png(db, c, pair.prompt_id, pair.seed) for c in pair.sides]
    except OSError as err:  # a render deleted or moved since it was registered
        st.session_state["rate_pair"] = None
        st.warning(f"Skipped a pair whose image is missing ({err}).")
        st.button("Next pair", key="vote_skip")
        return
    for col, name, png in zip(st.columns(2), ("A", "B"), pngs, strict=True):
        col.image(common.crisp(png, IMAGE_PX), caption=name, width=IMAGE_PX)
    cols = st.columns(len(BUTTONS) + 1)
    for col, (outcome, label, key) in zip(cols, BUTTONS, strict=False):
        col.button(
            label,
            key=f"vote_{outcome}",
            shortcut=key,
            width="stretch",
            type="primary" if outcome in ("left", "right") else "secondary",
            on_click=_vote,
            args=(outcome, pair.nonce, rater.rater_id),
        )
    cols[-1].button(
        "Undo",
        key="vote_undo",
        shortcut="U",
        width="stretch",
        disabled=not st.session_state["rate_history"],
        on_click=_undo,
        args=(rater.rater_id,),
    )


def summary_ui(rater: Rater) -> None:
    """Progress towards the session goal and what this session recorded."""
    ss = _state()
    s = session_summary(common.store(), rater.rater_id, ss["rate_session"])
    st.progress(
        min(s["votes"] / SESSION_GOAL, 1.0),
        text=f"{s['votes']} of {SESSION_GOAL} votes this session",
    )
    with st.expander("Session summary", expanded=s["votes"] >= SESSION_GOAL):
        c = st.columns(4)
        c[0].metric("Votes", s["votes"])
        c[1].metric(
            "Checks passed",
            f"{s['gold_correct']} / {s['gold']}",
            help="pairs with a known answer (an image against pure noise)",
        )
        latency = s["median_latency_s"]
        c[2].metric("Median time", "-" if latency is None else f"{latency:.1f} s")
        c[3].metric("All your votes", s["all_time_votes"])
        o = s["outcomes"]
        st.caption(
            f"A better {o['left']}, B better {o['right']}, tie {o['tie']}, "
            f"both bad {o['both_bad']}. Session {ss['rate_session']}."
        )


def main() -> None:
    st.title("Rate images")
    rater = rater_ui()
    if rater is None:
        return
    st.caption(
        f"Rating as **{rater.name or rater.rater_id}**. "
        "Keys: A, B, T (tie), X (both bad), U (undo)."
    )
    error = st.session_state.pop("rate_error", None)
    if error:
        st.warning(f"That vote was not recorded: {error}")
    pair = current_pair(rater)
    if pair is None:
        st.info(
            "Nothing to rate yet: the arena needs at least two contestants rendered on the "
            "same prompts (`harness arena add` / `harness arena render`)."
        )
    else:
        pair_ui(pair, rater)
    summary_ui(rater)


main()
