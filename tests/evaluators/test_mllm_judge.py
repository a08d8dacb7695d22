"""The MLLM judge against a real HTTP server on loopback speaking the OpenAI chat completions
shape (scripted per request: good, malformed, 429/500 then good, slow, refusing), and a tiny
randomly initialised LLaVA saved to disk and loaded through the local backend.

The scripted server judges by a hidden quality per image (looked up by the sha256 of the bytes
that arrived in the data URL), so a consistent judge and a position-biased judge are both easy
to write, and every assertion about outcomes follows from the script, not from the code."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
import threading
from pathlib import Path

import pytest
from PIL import Image

from evaluators.judging import PairItem, PairJudge
from evaluators.mllm_backends import (
    BackendConfigError,
    ImageInput,
    LoopbackChatServer,
    OpenAIBackend,
    RecordedRequest,
    Reply,
)
from evaluators.mllm_judge import (
    RUBRIC_VERSION,
    AnswerError,
    ImageItem,
    absolute_scores,
    build_judge,
    judgment_key,
    list_judgments,
    load_judgments,
    parse_absolute,
    parse_pairwise,
    rubric_fingerprint,
    save_judgments,
    winner_to_outcome,
)
from harness.store import Store

KEY = "sk-test-5f3a9c0d2e71b8"  # distinctive: searched for in rows and logs
# sha256 of the rubric per version: changing the rubric text without bumping RUBRIC_VERSION
# fails here (then add the new version's fingerprint).
RUBRIC_FINGERPRINTS = {
    "v1": "e950620f6b7eba0fc8ac5f225209b57abee1112a2c38921e032af7059c60b54c",
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "grey": (128,) * 3}
QUALITY = {"red": 9, "green": 6, "blue": 3, "grey": 1}


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny PNGs, one per colour."""
    directory = tmp_path_factory.mktemp("renders")
    out = {}
    for name, rgb in COLOURS.items():
        out[name] = directory / f"{name}.png"
        Image.new("RGB", (8, 8), rgb).save(out[name])
    return out


@pytest.fixture(scope="module")
def quality_by_sha(images: dict[str, Path]) -> dict[str, int]:
    return {hashlib.sha256(p.read_bytes()).hexdigest(): QUALITY[n] for n, p in images.items()}


def _decode(url: str) -> bytes:
    head, _, data = url.partition(",")
    assert head.startswith("data:image/png;base64"), head
    return base64.b64decode(data)


def _qualities(request: RecordedRequest, quality_by_sha: dict[str, int]) -> list[int]:
    return [quality_by_sha[hashlib.sha256(_decode(u)).hexdigest()] for u in request.images()]


def consistent(quality_by_sha: dict[str, int]):
    """A judge that prefers the better image wherever it is shown; absolute scores = quality."""

    def respond(request: RecordedRequest, n: int) -> Reply:
        q = _qualities(request, quality_by_sha)
        if len(q) == 1:
            answer = {"prompt_adherence": q[0], "visual_quality": 10 - q[0], "reasons": "ok"}
        else:
            answer = {"winner": "A" if q[0] > q[1] else "B" if q[1] > q[0] else "tie"}
            answer["reason"] = f"{q}"
        return Reply(json.dumps(answer))

    return respond


def always_a(request: RecordedRequest, n: int) -> Reply:
    """A position-biased judge: the first image always wins."""
    return Reply('```json\n{"winner": "A", "reason": "first is nicer"}\n```')


def judge_for(server: LoopbackChatServer, store: Store, **options):
    env = {
        "HARNESS_JUDGE_BASE_URL": server.url,
        "HARNESS_JUDGE_MODEL": "tiny-vlm",
        "HARNESS_JUDGE_API_KEY": KEY,
    }
    options = {"env": env, "backoff_s": 0.001, "backoff_cap_s": 0.01, **options}
    return build_judge("openai", store, **options)


def pair(images: dict[str, Path], left: str, right: str, prompt: str = "a red circle"):
    return PairItem(prompt, 0, f"c-{left}", f"c-{right}", images[left], images[right])


@pytest.fixture
def store():
    s = Store(":memory:")
    yield s
    s.close()


# -- pairwise ------------------------------------------------------------------------------------
def test_pairwise_asks_both_orders_over_http(images, quality_by_sha, store):
    with LoopbackChatServer(consistent(quality_by_sha)) as server:
        judge = judge_for(server, store, concurrency=2)
        items = [pair(images, "red", "blue"), pair(images, "grey", "green")]
        verdicts = judge.judge_pairs(items)

    assert isinstance(judge, PairJudge)
    assert judge.rater_id == f"judge:tiny-vlm:{RUBRIC_VERSION}" and judge.kind == "judge"
    assert [v.outcome for v in verdicts] == ["left", "right"]
    assert all(v.detail["agree"] for v in verdicts)
    assert [a["winner"] for a in verdicts[0].detail["answers"]] == ["A", "B"]
    assert [a["order"] for a in verdicts[0].detail["answers"]] == ["left,right", "right,left"]

    assert len(server.requests) == 4
    shown = sorted(tuple(_qualities(r, quality_by_sha)) for r in server.requests)
    assert shown == [(1, 6), (3, 9), (6, 1), (9, 3)]  # every pair in both orders
    for request in server.requests:
        assert request.path == "/v1/chat/completions"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.body["model"] == "tiny-vlm"
        assert request.body["response_format"]["type"] == "json_schema"
        assert '"a red circle"' in request.text()
        assert '{"winner": "A" | "B" | "tie" | "both_bad"' in request.text()
        assert "{{" not in request.text() and "{prompt}" not in request.text()
        parts = request.body["messages"][0]["content"]
        assert [p["type"] for p in parts].count("image_url") == 2

    rows = list_judgments(store, mode="pairwise")
    assert len(rows) == 4 and all(r["parsed"] and r["judge"] == "openai" for r in rows)
    by_key = {r["judgment_key"]: r for r in rows}
    first = by_key[verdicts[0].detail["judgments"][0]]
    assert first["images"] == [
        hashlib.sha256(images[c].read_bytes()).hexdigest() for c in ("red", "blue")
    ]
    assert first["result"]["winner"] == "A" and first["raw"].startswith("{")


def test_answers_that_flip_with_the_order_are_a_tie(images, store):
    with LoopbackChatServer(always_a) as server:
        verdict = judge_for(server, store).judge_pairs([pair(images, "red", "blue")])[0]
    assert verdict.outcome == "tie"
    assert verdict.detail["agree"] is False
    assert [a["outcome"] for a in verdict.detail["answers"]] == ["left", "right"]
    assert all(a["reason"] == "first is nicer" for a in verdict.detail["answers"])


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_cached_judgments_send_no_request(images, quality_by_sha, tmp_path, kind):
    store = Store(":memory:" if kind == "memory" else tmp_path / "r.duckdb")
    items = [pair(images, "red", "blue"), pair(images, "green", "grey")]
    with LoopbackChatServer(consistent(quality_by_sha)) as server:
        first = judge_for(server, store).judge_pairs(items)
        assert len(server.requests) == 4
        again = judge_for(server, store).judge_pairs(items[::-1])  # a fresh judge object
        assert len(server.requests) == 4  # all from the cache
        assert [v.outcome for v in again] == [v.outcome for v in first][::-1]
        assert all(a["cached"] for v in again for a in v.detail["answers"])
        # A new rubric version is a new question.
        judge_for(server, store, rubric_version="v-test").judge_pairs(items[:1])
        assert len(server.requests) == 6
    assert len(list_judgments(store)) == 6


def test_unparseable_answer_is_recorded_never_guessed(images, store):
    def respond(request: RecordedRequest, n: int) -> Reply:
        if n == 0:
            return Reply("I think the first image is better overall.")
        return Reply('{"winner": "B", "reason": "b"}')

    with LoopbackChatServer(respond) as server:
        judge = judge_for(server, store, concurrency=1)
        verdict = judge.judge_pairs([pair(images, "red", "blue")])[0]
        assert verdict.outcome is None
        assert "unparseable" in verdict.detail["error"]
        rows = sorted(list_judgments(store), key=lambda r: r["parsed"])
        assert [r["parsed"] for r in rows] == [False, True]
        assert rows[0]["raw"] == "I think the first image is better overall."
        assert rows[0]["result"] is None and "no JSON object" in rows[0]["error"]
        # An unparseable answer is an answer: cached, not asked again.
        assert judge.judge_pairs([pair(images, "red", "blue")])[0].outcome is None
        assert len(server.requests) == 2


# -- retries, timeouts, failures -----------------------------------------------------------------
def test_429_and_500_then_success(images, store):
    script = [
        Reply(status=429, error="slow down", headers={"Retry-After": "0"}),
        Reply(status=500, error="boom"),
        Reply(status=503, error="loading"),
        Reply('{"prompt_adherence": 7, "visual_quality": 8, "reasons": "fine"}'),
    ]
    with LoopbackChatServer(lambda r, n: script[n]) as server:
        judge = judge_for(server, store, max_attempts=4)
        [score] = absolute_scores(judge, [ImageItem("a red circle", images["red"])])
    assert len(server.requests) == 4
    assert (score.prompt_adherence, score.visual_quality, score.reasons) == (7, 8, "fine")
    assert score.parsed and not score.cached


def test_retries_are_bounded_and_a_failure_is_recorded_then_retried(images, store):
    with LoopbackChatServer(lambda r, n: Reply(status=502, error="bad gateway")) as server:
        judge = judge_for(server, store, max_attempts=3)
        verdict = judge.judge_pairs([pair(images, "red", "blue")])[0]
        assert len(server.requests) == 6  # 2 orders x 3 attempts
    assert verdict.outcome is None
    assert "gave up after 3 attempts; last: HTTP 502: bad gateway" in verdict.detail["error"]
    rows = list_judgments(store)
    assert len(rows) == 2 and all(not r["parsed"] and r["raw"] is None for r in rows)
    # A failed request is not an answer: the next run asks again and replaces the row.
    with LoopbackChatServer(always_a) as server:
        verdict = judge_for(server, store).judge_pairs([pair(images, "red", "blue")])[0]
        assert len(server.requests) == 2
    assert verdict.outcome == "tie"
    assert all(r["parsed"] for r in list_judgments(store))


def test_backoff_is_exponential_with_jitter_and_honours_retry_after(images):
    script = [Reply(status=500, error="x")] * 4 + [
        Reply(status=429, error="later", headers={"Retry-After": "7"}),
        Reply('{"prompt_adherence": 1, "visual_quality": 1, "reasons": ""}'),
    ]
    sleeps: list[float] = []
    with LoopbackChatServer(lambda r, n: script[n]) as server:
        backend = OpenAIBackend(
            base_url=server.url, model="m", api_key=KEY, max_attempts=6, backoff_s=1.0,
            backoff_cap_s=3.0, sleep=sleeps.append,
        )  # fmt: skip
        answer = backend.ask(["rate", ImageInput.load(images["red"])], {})
    assert answer.attempts == 6 and len(sleeps) == 5
    caps = [1.0, 2.0, 3.0, 3.0]  # 1 s doubling, capped at 3 s
    assert all(0 <= s <= c for s, c in zip(sleeps[:4], caps, strict=True))
    assert len(set(sleeps[:4])) == 4  # jittered, not a fixed schedule
    assert sleeps[4] == 7.0  # the server's Retry-After beats our shorter pause
    assert KEY not in repr(backend) and KEY not in repr(vars(backend))


def test_slow_answer_times_out_and_is_retried(images, store):
    def respond(request: RecordedRequest, n: int) -> Reply:
        good = '{"prompt_adherence": 5, "visual_quality": 5, "reasons": "r"}'
        return Reply(good, delay_s=2.0 if n == 0 else 0.0)

    with LoopbackChatServer(respond) as server:
        judge = judge_for(server, store, timeout_s=0.5)  # generous: CI is loaded
        [score] = judge.absolute_scores([ImageItem("p", images["green"])])
    assert score.parsed and score.prompt_adherence == 5
    assert len(server.requests) == 2


def test_connection_refused_is_bounded(images, store):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HARNESS_JUDGE_BASE_URL": f"http://127.0.0.1:{port}/v1", "HARNESS_JUDGE_MODEL": "m"}
    judge = build_judge("openai", store, env=env, max_attempts=2, backoff_s=0.001)
    [score] = judge.absolute_scores([ImageItem("p", images["red"])])
    assert not score.parsed and score.prompt_adherence is None
    assert "gave up after 2 attempts; last: connection error" in score.error


def test_concurrency_is_bounded(images, quality_by_sha, store):
    def respond(request: RecordedRequest, n: int) -> Reply:
        return Reply(consistent(quality_by_sha)(request, n).content, delay_s=0.05)

    names = list(COLOURS)  # every ordered pair of distinct colours: 12 pairs, 24 requests
    items = [pair(images, a, b, f"{a}-{b}") for a in names for b in names if a != b]
    with LoopbackChatServer(respond) as server:
        verdicts = judge_for(server, store, concurrency=3).judge_pairs(items)
    assert len(server.requests) == 2 * len(items)
    assert 2 <= server.max_in_flight <= 3  # parallel, and never above the bound
    assert all(v.outcome in ("left", "right") for v in verdicts)


def test_response_format_falls_back_when_rejected(images, quality_by_sha, store):
    def respond(request: RecordedRequest, n: int) -> Reply:
        fmt = request.body.get("response_format", {}).get("type")
        if fmt is not None:
            return Reply(status=400, error=f"response_format type {fmt} is not supported")
        return consistent(quality_by_sha)(request, n)

    with LoopbackChatServer(respond) as server:
        judge = judge_for(server, store, concurrency=1)
        verdict = judge.judge_pairs([pair(images, "blue", "red")])[0]
    assert verdict.outcome == "right"
    formats = [r.body.get("response_format", {}).get("type") for r in server.requests]
    assert formats == ["json_schema", "json_object", None, None]  # remembered after the drop
    assert judge.backend.response_format == "none"


def test_other_400_does_not_switch_structured_output_off(images, store):
    with LoopbackChatServer(lambda r, n: Reply(status=400, error="image too large")) as server:
        judge = judge_for(server, store, concurrency=1)
        [score] = judge.absolute_scores([ImageItem("p", images["red"])])
        assert len(server.requests) == 1  # a 400 is not retried
    assert score.error == "HTTP 400: image too large"
    assert judge.backend.response_format == "json_schema"


def test_refused_key_stops_the_batch_keeps_answers_and_never_leaks(
    images, quality_by_sha, store, caplog
):
    caplog.set_level(logging.DEBUG)
    ok = consistent(quality_by_sha)

    def respond(request: RecordedRequest, n: int) -> Reply:
        if n < 2:
            return ok(request, n)
        # A careless server echoes the credentials it refused.
        return Reply(status=401, error=f"invalid key {request.headers['authorization']}")

    items = [pair(images, "red", "blue"), pair(images, "green", "grey")]
    with LoopbackChatServer(respond) as server:
        judge = judge_for(server, store, concurrency=1)
        with pytest.raises(BackendConfigError, match="HARNESS_JUDGE_API_KEY") as info:
            judge.judge_pairs(items)
        assert len(server.requests) == 3  # stopped at the first refusal
    assert KEY not in str(info.value) and "<redacted>" in str(info.value)
    assert len(list_judgments(store)) == 2  # the answers already paid for are stored
    assert KEY not in json.dumps(list_judgments(store), default=str)
    assert KEY not in caplog.text and KEY not in repr(judge)
    assert "judge" in repr(judge)


def test_key_is_in_no_row_detail_or_log_line(images, store, caplog):
    caplog.set_level(logging.DEBUG)
    script = [
        Reply(status=500, error=f"upstream said {KEY}"),
        Reply(f'{{"winner": "A", "reason": "echo {KEY}"}}'),
        Reply(f"no json here {KEY}"),
    ]
    with LoopbackChatServer(lambda r, n: script[n]) as server:
        verdict = judge_for(server, store, concurrency=1).judge_pairs(
            [pair(images, "red", "blue")]
        )[0]
    assert "retrying" in caplog.text  # the retry was logged ...
    assert KEY not in caplog.text  # ... without the key
    assert KEY not in json.dumps(verdict.detail)
    assert KEY not in json.dumps(list_judgments(store), default=str)
    assert any("<redacted>" in (r["raw"] or "") for r in list_judgments(store))


# -- absolute mode and parsing -------------------------------------------------------------------
def test_absolute_scores_validate_range(images, quality_by_sha, store):
    def respond(request: RecordedRequest, n: int) -> Reply:
        q = _qualities(request, quality_by_sha)[0]
        if q == 1:  # grey: out of range
            return Reply('{"prompt_adherence": 11, "visual_quality": 1, "reasons": "?"}')
        return consistent(quality_by_sha)(request, n)

    items = [ImageItem("a shape", images[c], f"c-{c}") for c in ("red", "blue", "grey", "red")]
    with LoopbackChatServer(respond) as server:
        scores = absolute_scores(judge_for(server, store), items)
        assert len(server.requests) == 3  # the repeated image is asked once
    assert [s.prompt_adherence for s in scores] == [9, 3, None, 9]
    assert [s.visual_quality for s in scores] == [1, 7, None, 1]
    assert "prompt_adherence 11 is outside 1..10" in scores[2].error
    assert scores[0].judgment_key == scores[3].judgment_key
    assert {r["mode"] for r in list_judgments(store)} == {"absolute"}


@pytest.mark.parametrize(
    ("text", "winner"),
    [
        ('{"winner": "A", "reason": "r"}', "A"),
        ('```json\n{"winner": "b", "reason": "r"}\n```', "B"),
        ('Sure! Here it is: {"winner": "Image A", "reason": "has {braces}"} Hope it helps.', "A"),
        ('{"winner": "both bad", "reason": "neither"}', "both_bad"),
        ('{"winner": "TIE", "reason": ""}', "tie"),
        ('{"note": 1} then {"winner": "B", "reason": "x"}', None),  # first object: no winner
    ],
)
def test_parse_pairwise(text, winner):
    if winner is None:
        with pytest.raises(AnswerError, match="'winner' must be one of"):
            parse_pairwise(text)
    else:
        assert parse_pairwise(text)["winner"] == winner


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"prompt_adherence": 7.0, "visual_quality": 1, "reasons": "r"}', None),
        ('{"prompt_adherence": 7.5, "visual_quality": 1, "reasons": "r"}', "must be an integer"),
        ('{"prompt_adherence": "7", "visual_quality": 1, "reasons": "r"}', "must be an integer"),
        ('{"prompt_adherence": true, "visual_quality": 1, "reasons": "r"}', "must be an integer"),
        ('{"prompt_adherence": 0, "visual_quality": 1, "reasons": "r"}', "outside 1..10"),
        ('{"visual_quality": 1, "reasons": "r"}', "missing 'prompt_adherence'"),
        ('{"prompt_adherence": 3, "visual_quality": 1}', "'reasons' must be a string"),
        ('{"prompt_adherence": 3, "visual_quality": 1, "reasons": "r"', "no JSON object"),
        ("", "empty reply"),
        ('["a list"]', "no JSON object"),
    ],
)
def test_parse_absolute(text, error):
    if error is None:
        assert parse_absolute(text) == {"prompt_adherence": 7, "visual_quality": 1, "reasons": "r"}
    else:
        with pytest.raises(AnswerError, match=error):
            parse_absolute(text)


def test_winner_mapping_is_its_own_inverse_under_swap():
    assert [winner_to_outcome(w, False) for w in ("A", "B", "tie", "both_bad")] == [
        "left", "right", "tie", "both_bad",
    ]  # fmt: skip
    assert [winner_to_outcome(w, True) for w in ("A", "B")] == ["right", "left"]


def test_rubric_change_needs_a_version_bump():
    assert RUBRIC_FINGERPRINTS.get(RUBRIC_VERSION) == rubric_fingerprint(), (
        "the rubric text changed: bump RUBRIC_VERSION and pin the new fingerprint here"
    )


def test_judgment_key_depends_on_order_and_every_field():
    base = (["a", "b"], "p", "openai", "m", "v1", "pairwise")
    keys = {judgment_key(*base)}
    for i, changed in enumerate([["b", "a"], "q", "local", "m2", "v2", "absolute"]):
        args = list(base)
        args[i] = changed
        keys.add(judgment_key(*args))
    assert len(keys) == 7


def test_save_judgments_upserts(store):
    row = {
        "judgment_key": "k", "judge": "openai", "model": "m", "mode": "absolute",
        "rubric_version": "v1", "prompt": "p", "images": ["s"], "parsed": False, "result": None,
        "raw": None, "error": "gave up", "latency_s": 1.0, "time": 1.0,
    }  # fmt: skip
    save_judgments(store, [row])
    save_judgments(store, [dict(row, parsed=True, result={"x": 1}, raw="{}", error=None)])
    stored = load_judgments(store, ["k", "missing"])
    assert list(stored) == ["k"]
    assert stored["k"]["result"] == {"x": 1} and stored["k"]["images"] == ["s"]


# -- configuration errors ------------------------------------------------------------------------
def test_build_judge_errors(store, tmp_path):
    with pytest.raises(ValueError, match="did you mean 'openai'"):
        build_judge("opnai", store)
    with pytest.raises(TypeError, match=r"concurency.*did you mean 'concurrency'"):
        build_judge("openai", store, env={}, concurency=3)
    with pytest.raises(BackendConfigError, match="HARNESS_JUDGE_BASE_URL"):
        build_judge("openai", store, env={"HARNESS_JUDGE_MODEL": "m"})
    with pytest.raises(BackendConfigError, match="HARNESS_JUDGE_MODEL"):
        build_judge("openai", store, env={"HARNESS_JUDGE_BASE_URL": "http://x/v1"})
    with pytest.raises(ValueError, match="concurrency must be > 0"):
        env = {"HARNESS_JUDGE_BASE_URL": "http://x/v1", "HARNESS_JUDGE_MODEL": "m"}
        build_judge("openai", store, env=env, concurrency=0)
    with pytest.raises(BackendConfigError, match=r"no vision-language model at .*nowhere"):
        build_judge(f"local:{tmp_path / 'nowhere'}", store)


def test_missing_image_fails_before_any_request(images, store, tmp_path):
    with LoopbackChatServer(always_a) as server:
        judge = judge_for(server, store)
        missing = PairItem("p", 0, "a", "b", images["red"], tmp_path / "gone.png")
        with pytest.raises(FileNotFoundError, match=r"gone\.png does not exist"):
            judge.judge_pairs([pair(images, "red", "blue"), missing])
        assert server.requests == []


# -- local transformers VLM ----------------------------------------------------------------------
def _write_tiny_llava(directory: Path) -> Path:
    """A randomly initialised LLaVA (CLIP vision tower + Llama, hidden size 16) with a
    byte-level BPE tokenizer and a chat template, saved like a downloaded checkpoint."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tests.tokenizers_util import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer(("<image>",), extra_special_tokens={"image_token": "<image>"})
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's class token
        chat_template=template,
    ).save_pretrained(directory)
    tiny = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model", "num_attention_heads": 2, "image_size": 16,
            "patch_size": 8, **tiny,
        },
        text_config={
            "model_type": "llama", "num_attention_heads": 2, "num_key_value_heads": 2,
            "vocab_size": len(tokenizer), "max_position_embeddings": 4096, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 3, **tiny,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_local_vlm_random_weights_are_unparseable_and_cached(images, tmp_path, monkeypatch):
    directory = _write_tiny_llava(tmp_path / "tiny-llava")
    store = Store(tmp_path / "r.duckdb")
    judge = build_judge(f"local:{directory}", store, max_new_tokens=12)
    assert judge.rater_id == f"judge:tiny-llava:{RUBRIC_VERSION}"

    verdict = judge.judge_pairs([pair(images, "red", "blue")])[0]
    scores = judge.absolute_scores([ImageItem("a red circle", images["red"])])
    assert verdict.outcome is None and "unparseable" in verdict.detail["error"]
    assert scores[0].prompt_adherence is None and not scores[0].parsed
    rows = list_judgments(store)
    assert len(rows) == 3 and {r["judge"] for r in rows} == {"local"}
    assert all(not r["parsed"] and r["raw"] is not None for r in rows)

    # Only the new tokens are the answer: a model that continues the prompt with a valid JSON
    # object is parsed (generate is scripted; the prompt, processor and decoding are real).
    import torch

    backend = judge.backend
    answer_ids = backend.processor.tokenizer('{"winner": "A", "reason": "first"}')["input_ids"]
    real_generate = backend.vlm.generate

    def scripted_generate(**inputs):
        real_generate(**{**inputs, "max_new_tokens": 1})  # the real forward pass still runs
        return torch.cat([inputs["input_ids"], torch.tensor([answer_ids])], dim=1)

    monkeypatch.setattr(backend.vlm, "generate", scripted_generate)
    scripted = judge.judge_pairs([pair(images, "green", "grey")])[0]
    assert scripted.outcome == "tie"  # "A" in both orders: a position preference
    assert [a["reason"] for a in scripted.detail["answers"]] == ["first", "first"]
    raws = {r["raw"] for r in load_judgments(store, scripted.detail["judgments"]).values()}
    assert raws == {'{"winner": "A", "reason": "first"}'}  # the reply alone, not the prompt

    calls = threading.Event()
    monkeypatch.setattr(backend, "ask", lambda *a, **k: calls.set())
    again = judge.judge_pairs([pair(images, "red", "blue")])[0]
    assert not calls.is_set() and again.detail["answers"][0]["cached"]


def test_cli_judge_without_server_config_exits_2_with_the_fix(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from harness.cli import app

    for name in ("HARNESS_JUDGE_BASE_URL", "HARNESS_JUDGE_MODEL", "HARNESS_JUDGE_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    Store(tmp_path / "harness.duckdb")
    result = CliRunner().invoke(app, ["judge", "--judge", "openai", "--workdir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "set HARNESS_JUDGE_BASE_URL" in result.output
    assert "Traceback" not in result.output


def test_cli_judge_passes_concurrency_to_the_openai_judge_only(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import harness.arena_pipeline as pipeline
    from harness.cli import app

    seen = {}

    def fake_build(name, store, **options):
        seen.update(name=name, options=options)
        raise pipeline.ArenaError("stop here")

    monkeypatch.setattr(pipeline, "build_judge", fake_build)
    Store(tmp_path / "harness.duckdb")
    args = ["judge", "--judge", "openai", "--concurrency", "3", "--workdir", str(tmp_path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "stop here" in result.output
    assert seen == {"name": "openai", "options": {"concurrency": 3}}
    args[2] = "domain"
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "openai only" in result.output
