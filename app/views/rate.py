"""Rating page: a person with a personal link judges pairs of anonymised images.

State (``st.session_state``, per browser session): ``rate_session`` (the session id stored
with each vote), ``rate_queue`` (planned pairs), ``rate_pair`` (the pair on screen, issued with
a nonce and its issue time), ``rate_voted`` (nonces already voted on) and ``rate_history``
(votes of this session, newest last, for undo; its length is the session's progress). Votes
are cast in button callbacks, which run before the page is drawn again, and each callback
carries the nonce of the pair it was drawn for: a second click on a pair already voted on, or
a click that arrives after the page moved on, is ignored; and the store itself counts a vote
once (:mod:`harness.voting`). Each vote re-checks the link's token against the store, so a
link revoked or rotated mid-session (``harness raters add NAME --new-token``) casts nothing.

Images are sent as the render files' own PNG bytes in a data URI (lossless, no second
request), framed so that a position can be judged on a white background, and sized to fit a
1366x768 screen with the vote buttons. After a pair is drawn, the next one is planned and its
images read (prefetch), so a vote moves to the next pair without waiting for the store or the
disk. A session ends after ``SESSION_GOAL`` votes with its summary.

Keys: A (left better), B (right better), T (tie), X (both bad), U (undo): Streamlit's own
button shortcuts (``st.button(shortcut=...)``), active while focus is not in a text field.
"""

from __future__ import annotations

import base64
import html
import io
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
IMAGE_PX = 384  # largest side of a shown image; less where the window is short
# What the page needs above and below the images at 1366x768 (navigation, title, prompt,
# captions, buttons), measured in the browser test: images shrink so that the buttons stay
# on screen.
CHROME_PX = 330
BATCH = 5
BUTTONS = (
    ("left", "A is better", "A"),
    ("right", "B is better", "B"),
    ("tie", "Tie", "T"),
    ("both_bad", "Both bad", "X"),
)
REVOKED = (
    "This link's token is no longer valid (revoked or replaced): the vote was not recorded. "
    "Ask the arena's organiser for a new link."
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


def session_votes() -> int:
    """Votes this session has recorded (undone ones excluded)."""
    return len(_state()["rate_history"])


def current_pair(rater: Rater) -> IssuedPair | None:
    """The pair on screen, issuing the next planned one when there is none."""
    ss = _state()
    if ss["rate_pair"] is None:
        _fill_queue(rater)
        if ss["rate_queue"]:
            ss["rate_pair"] = issue(ss["rate_queue"].pop(0))
    return ss["rate_pair"]


def _fill_queue(rater: Rater) -> None:
    ss = _state()
    if not ss["rate_queue"]:
        ss["rate_queue"] = plan_pairs(common.store(), rater.rater_id, BATCH, rng=ss["rate_rng"])


def prefetch(rater: Rater) -> None:
    """Plan the next pair and read its two images into the cache while the rater looks at
    this one, so that the vote's rerun only issues it and draws it."""
    if session_votes() + 1 >= SESSION_GOAL:
        return  # the pair on screen is the session's last
    _fill_queue(rater)
    queue = _state()["rate_queue"]
    if queue:
        nxt = queue[0]
        for side in nxt.sides:
            try:
                common.render_png(common.db_path(), side, nxt.prompt_id, nxt.seed)
            except OSError:
                return  # shown as a skipped pair when it comes up


def _vote(outcome: str, nonce: str, rater_id: str) -> None:
    """Button callback: record the vote on the pair with ``nonce`` if it is still on screen
    and the link's token still belongs to ``rater_id``."""
    ss = _state()
    pair: IssuedPair | None = ss["rate_pair"]
    if pair is None or pair.nonce != nonce or nonce in ss["rate_voted"]:
        return  # a double click or a stale click: this pair was voted on already
    if session_votes() >= SESSION_GOAL:
        return  # the session is over
    store = common.store()
    if store is None:
        return
    # The page authenticated the token when it was drawn; it may have been revoked since.
    rater = authenticate(store, ss.get("rate_token"))
    if rater is None or rater.rater_id != rater_id:
        ss["rate_error"] = REVOKED
        return
    try:
        result = record_vote(store, pair, outcome, rater_id, ss["rate_session"])
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


def _new_session() -> None:
    """Button callback: start another session (new id, progress back to zero)."""
    ss = _state()
    ss["rate_session"] = "app-" + secrets.token_hex(6)
    ss["rate_history"] = []
    ss["rate_voted"] = set()
    ss["rate_pair"] = None


def image_html(png: bytes, name: str) -> str:
    """``png`` as an ``<img>`` with its own bytes in a data URI (Streamlit's st.image would
    re-encode an opaque PNG as JPEG, and resize a large one), in a mid-grey frame, scaled by
    the browser: nearest-neighbour for a small image so its pixels stay sharp."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
    side = f"min({IMAGE_PX}px, calc(100vh - {CHROME_PX}px))"
    size = f"height: {side}; width: auto;" if height >= width else f"width: {side};"
    rendering = "pixelated" if max(width, height) * 2 <= IMAGE_PX else "auto"
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return (
        f'<div class="rate-image" style="text-align: center;">'
        f'<img src="{uri}" alt="{html.escape(name)}" data-testid="rate-image" '
        f'style="{size} max-width: 100%; object-fit: contain; image-rendering: {rendering}; '
        f'border: 2px solid #808080; padding: 4px; box-sizing: content-box;">'
        f'<div style="font-weight: 600;">{html.escape(name)}</div></div>'
    )


def pair_ui(pair: IssuedPair, rater: Rater) -> bool:
    """The prompt, the two images (A left, B right) and the vote buttons; False when the pair
    was skipped (an image is missing)."""
    db = common.db_path()
    st.markdown(
        f"**Prompt:** {pair.prompt}  \n"
        ":gray[Which image shows the prompt better? Judge prompt following first, then quality.]"
    )
    try:
        pngs = [common.render_png(db, c, pair.prompt_id, pair.seed) for c in pair.sides]
    except OSError as err:  # a render deleted or moved since it was registered
        st.session_state["rate_pair"] = None
        st.warning(f"Skipped a pair whose image is missing ({err}).")
        st.button("Next pair", key="vote_skip")
        return False
    rewritten = common.enhanced_prompts(db, tuple(pair.sides), pair.prompt_id, pair.seed)
    for col, name, png, side in zip(st.columns(2), ("A", "B"), pngs, pair.sides, strict=True):
        col.markdown(image_html(png, name), unsafe_allow_html=True)
        if side in rewritten:  # judged against the prompt above; the model was given this
            col.caption(f"enhanced prompt given to the model: {rewritten[side]}")
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
    return True


def progress_ui() -> None:
    """Progress towards the session goal: "k of N", k never above N."""
    k = min(session_votes(), SESSION_GOAL)
    st.progress(k / SESSION_GOAL, text=f"{k} of {SESSION_GOAL} votes this session")


def summary_ui(rater: Rater) -> None:
    """The end of a session: what it recorded, and a button to start another."""
    ss = _state()
    s = session_summary(common.store(), rater.rater_id, ss["rate_session"])
    st.success(f"Session complete: {s['votes']} votes. Thank you!")
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
    c = st.columns([2, 1, 3])
    c[0].button(
        "Start another session", key="rate_new_session", type="primary", on_click=_new_session
    )
    c[1].button(
        "Undo last vote", key="vote_undo", shortcut="U", on_click=_undo, args=(rater.rater_id,)
    )


def main() -> None:
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
    if session_votes() >= SESSION_GOAL:
        progress_ui()
        summary_ui(rater)
        return
    pair = current_pair(rater)
    if pair is None:
        st.info(
            "Nothing to rate yet: the arena needs at least two contestants rendered on the "
            "same prompts (`harness arena add` / `harness arena render`)."
        )
    elif pair_ui(pair, rater):
        progress_ui()
        prefetch(rater)
        return
    progress_ui()


main()
