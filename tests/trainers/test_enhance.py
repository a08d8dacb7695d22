"""Prompt enhancers (trainers/enhance.py): the learned shapes rewriter, the OpenAI-compatible
backend against a local fake server, and the transformers backend with tiny random models
built offline. The shapes enhancer is trained once per module (a few seconds)."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from trainers import enhance as E
from trainers.config import EnhancerConfig
from trainers.data.shapes import ATTRIBUTE_NAMES, DATASET_VERSION, ShapeAttrs
from trainers.data.terse import terse_prompts
from trainers.enhance import (
    DEFAULT_INSTRUCTION,
    EnhancerError,
    OpenAIEnhancer,
    ShapesEnhancer,
    ShapesRecipe,
    TransformersEnhancer,
    build_enhancer,
    enhancer_label,
)

# Trains in well under a second; quality is irrelevant, only the cache logic matters.
TINY = ShapesRecipe(examples=300, canonical_repeats=0, epochs=1, buckets=1 << 10, dim=8, hidden=8)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesEnhancer:
    enh = ShapesEnhancer(cache_dir=tmp_path_factory.mktemp("enhancer-cache"))
    enh.net()
    return enh


# --------------------------------------------------------------------------------------------
# shapes


def test_full_canonical_captions_come_back_unchanged(shapes: ShapesEnhancer) -> None:
    captions = [caption for caption, _ in E._canonical_captions()]
    assert len(captions) == 720
    out = shapes.enhance(captions)
    misses = [(c, o) for c, o in zip(captions, out, strict=True) if c != o]
    assert misses == []


def test_heldout_paraphrase_slot_accuracy(shapes: ShapesEnhancer) -> None:
    """Frames, prefixes and separators the training prompts never use (measured: 0.98)."""
    pairs = E.paraphrase_eval(1000)
    train_prompts = set(E._training_set(dataclasses.replace(shapes.recipe, examples=5000))[0])
    assert not train_prompts & {p for p, _ in pairs}
    preds = shapes.predict([p for p, _ in pairs])
    slots = [getattr(a, n) == v for (_, vals), a in zip(pairs, preds, strict=True)
             for n, v in vals.items()]  # fmt: skip
    assert sum(slots) / len(slots) >= 0.95


def test_terse_prompt_set_is_read_correctly(shapes: ShapesEnhancer) -> None:
    prompts = terse_prompts()
    preds = shapes.predict([p.prompt for p in prompts])
    slots = [getattr(a, n) == v for p, a in zip(prompts, preds, strict=True)
             for n, v in p.attributes.items()]  # fmt: skip
    assert sum(slots) / len(slots) >= 0.95


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("red ball, top left", "large red circle top left black"),
        ("big blue box on white", "large blue square center white"),
        ("tiny grey", "small red circle center gray"),
        ("violet dimond", "large purple diamond center black"),
        ("aqua thing in the upper-right", "large cyan circle top right black"),
        ("white background, small trinagle, lower left", "small red triangle bottom left white"),
    ],
)  # fmt: skip
def test_synonyms_typos_and_order_generalise(
    shapes: ShapesEnhancer, prompt: str, expected: str
) -> None:
    """``expected``: size colour shape position background (two-word positions)."""
    size, colour, shape, *rest = expected.split()
    position, background = " ".join(rest[:-1]), rest[-1]
    attrs = ShapeAttrs(shape, colour, size, position, background)
    assert shapes.enhance([prompt]) == [attrs.caption]


def test_unnamed_slots_get_the_prior(shapes: ShapesEnhancer) -> None:
    (attrs,) = shapes.predict(["a thing"])
    assert attrs == ShapeAttrs(**E.SHAPES_PRIOR)


def test_enhance_keeps_order_and_memoises(
    shapes: ShapesEnhancer, monkeypatch: pytest.MonkeyPatch
) -> None:
    enh = ShapesEnhancer(cache_dir=shapes.weights_path.parent)
    enh._net = shapes.net()
    calls: list[list[str]] = []
    real = enh._rewrite
    monkeypatch.setattr(enh, "_rewrite", lambda ps: calls.append(ps) or real(ps))
    out = enh.enhance(["red ball", "blue box", "red ball"])
    assert out[0] == out[2] != out[1]
    assert calls == [["red ball", "blue box"]]
    assert enh.enhance(["blue box", "green dot"])[0] == out[1]
    assert calls[1:] == [["green dot"]]
    assert enh.enhance([]) == []
    with pytest.raises(TypeError, match="sequence of prompts"):
        enh.enhance("red ball")


def test_cache_hit_is_deterministic_and_does_not_retrain(shapes: ShapesEnhancer) -> None:
    before = E._TRAIN_COUNT
    again = ShapesEnhancer(cache_dir=shapes.weights_path.parent)
    prompts = ["tiny violet pyramid, bottom right", "huge aqua box on grey"]
    assert again.enhance(prompts) == shapes.enhance(prompts)
    assert before == E._TRAIN_COUNT
    meta = json.loads(shapes.weights_path.with_suffix(".json").read_text())
    assert meta["recipe_hash"] == shapes.recipe.hash()
    assert meta["train_seconds"] < 60


def test_training_is_deterministic(tmp_path: Path) -> None:
    a = ShapesEnhancer(cache_dir=tmp_path / "a", recipe=TINY).net()
    b = ShapesEnhancer(cache_dir=tmp_path / "b", recipe=TINY).net()
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(va, vb), k


def test_corrupt_cache_is_retrained_with_a_warning(tmp_path: Path) -> None:
    enh = ShapesEnhancer(cache_dir=tmp_path, recipe=TINY)
    expected = enh.enhance(["red ball"])
    path = enh.weights_path
    path.write_bytes(path.read_bytes()[:100])  # truncated
    before = E._TRAIN_COUNT
    fresh = ShapesEnhancer(cache_dir=tmp_path, recipe=TINY)
    with pytest.warns(UserWarning, match="unusable"):
        assert fresh.enhance(["red ball"]) == expected
    assert before + 1 == E._TRAIN_COUNT
    path.with_suffix(".json").write_text("{not json")
    with pytest.warns(UserWarning, match="unusable"):
        ShapesEnhancer(cache_dir=tmp_path, recipe=TINY).net()
    assert ShapesEnhancer(cache_dir=tmp_path, recipe=TINY).enhance(["red ball"]) == expected


def test_recipe_change_changes_version_and_cache_file(tmp_path: Path) -> None:
    a = ShapesEnhancer(cache_dir=tmp_path, recipe=TINY)
    b = ShapesEnhancer(cache_dir=tmp_path, recipe=dataclasses.replace(TINY, seed=TINY.seed + 1))
    assert a.provenance()["version"] != b.provenance()["version"]
    assert a.weights_path != b.weights_path
    assert ShapesEnhancer().provenance() == ShapesEnhancer().provenance()


def test_lexicon_edit_changes_the_recipe_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    before = ShapesRecipe().hash()
    monkeypatch.setitem(E._COLOURS, "red", ("red", "crimson", "scarlet", "ruby"))
    assert ShapesRecipe().hash() != before


def test_training_works_under_no_grad(tmp_path: Path) -> None:
    with torch.inference_mode():
        out = ShapesEnhancer(cache_dir=tmp_path, recipe=TINY).enhance(["red ball"])
    assert len(out) == 1


def test_shapes_provenance_and_label(shapes: ShapesEnhancer) -> None:
    prov = shapes.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert prov["backend"] == "shapes"
    assert prov["dataset_version"] == DATASET_VERSION
    assert prov["version"] == shapes.recipe.hash()[:8]
    assert enhancer_label(prov) == f"shapes@{prov['version']}"
    assert enhancer_label(None) == "none"


# --------------------------------------------------------------------------------------------
# build_enhancer


def test_build_enhancer_from_dict_config_and_none(tmp_path: Path) -> None:
    assert build_enhancer(None) is None
    enh = build_enhancer({"backend": "shapes"}, cache_dir=tmp_path)
    assert isinstance(enh, ShapesEnhancer)
    assert enh.weights_path.parent == tmp_path
    assert isinstance(build_enhancer(EnhancerConfig(backend="shapes")), ShapesEnhancer)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"backend": "shapes", "colour": 1}, r"prompt_enhancer\.colour"),
        ({"backend": "nope"}, r"prompt_enhancer\.backend"),
        ({"backend": "transformers"}, r"prompt_enhancer\.path is required"),
        ({"backend": "shapes", "max_new_tokens": 0}, r"prompt_enhancer\.max_new_tokens"),
        ("shapes", "must be a mapping"),
    ],
)
def test_build_enhancer_rejects_bad_config(cfg: object, match: str) -> None:
    with pytest.raises(EnhancerError, match=match):
        build_enhancer(cfg)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# openai: a fake OpenAI-compatible server

KEY = "sk-test-SECRET-123"


class FakeServer:
    """``POST /v1/chat/completions`` on 127.0.0.1; ``reply(body, n) -> (status, payload)``."""

    def __init__(self, reply: Callable[[dict, int], tuple[int, dict]]) -> None:
        self.requests: list[tuple[str, dict[str, str], dict]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                n = len(server.requests)
                server.requests.append((self.path, dict(self.headers), body))
                status, payload = reply(body, n)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that timed out and hung up: expected in the timeout test

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def completion(text: str) -> dict:
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def echo_caption(body: dict, n: int) -> tuple[int, dict]:
    prompt = body["messages"][-1]["content"].rsplit("Prompt: ", 1)[1]
    return 200, completion(f'"a caption for {prompt}"\nsome chatter')


def env_for(url: str, **extra: str) -> dict[str, str]:
    return {E.ENV_BASE_URL: url, E.ENV_MODEL: "tiny-llm", E.ENV_API_KEY: KEY, **extra}


def test_openai_request_shape_auth_and_one_request_per_prompt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with FakeServer(echo_caption) as server:
        for k, v in env_for(server.url).items():
            monkeypatch.setenv(k, v)
        enh = build_enhancer({"backend": "openai", "max_new_tokens": 33})
        assert isinstance(enh, OpenAIEnhancer)
        out = enh.enhance(["red ball", "blue box", "red ball"])
    assert out == ["a caption for red ball", "a caption for blue box", "a caption for red ball"]
    assert len(server.requests) == 2
    path, headers, body = server.requests[0]
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "tiny-llm"
    assert body["temperature"] == 0
    assert body["max_tokens"] == 33
    (message,) = body["messages"]
    assert message["role"] == "user"
    assert message["content"] == f"{DEFAULT_INSTRUCTION}\n\nPrompt: red ball"
    prov = enh.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert KEY not in json.dumps(prov) and KEY not in repr(enh)
    assert prov["host"] == server.url.split("/")[2]
    assert prov["model"] == "tiny-llm"


def test_openai_config_model_and_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeServer(echo_caption) as server:
        for k, v in env_for(server.url).items():
            monkeypatch.setenv(k, v)
        enh = build_enhancer({"backend": "openai", "model": "other", "instruction": "Do it."})
        assert enh is not None
        enh.enhance(["x"])
    body = server.requests[0][2]
    assert body["model"] == "other"
    assert body["messages"][0]["content"] == "Do it.\n\nPrompt: x"
    base = OpenAIEnhancer(base_url=server.url, model="other").provenance()
    assert enh.provenance()["version"] != base["version"]  # instruction is in the version
    other_model = OpenAIEnhancer(base_url=server.url, model="m2").provenance()
    assert other_model["version"] != base["version"]
    assert OpenAIEnhancer(base_url="http://elsewhere:1/v1", model="other").provenance() != base
    assert (
        OpenAIEnhancer(base_url="http://elsewhere:1/v1", model="other").provenance()["version"]
        == base["version"]
    )


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({}, E.ENV_BASE_URL),
        ({E.ENV_BASE_URL: "ftp://host/v1"}, "not an http"),
        ({E.ENV_BASE_URL: "http://localhost:1/v1"}, E.ENV_MODEL),
    ],
)
def test_openai_missing_configuration(env: dict[str, str], match: str) -> None:
    with pytest.raises(EnhancerError, match=match):
        OpenAIEnhancer.from_env(env)


def test_openai_url_credentials_are_never_shown_or_sent() -> None:
    env = {E.ENV_BASE_URL: f"http://user:{KEY}@127.0.0.1:1/v1", E.ENV_MODEL: "m"}
    with pytest.raises(EnhancerError, match=E.ENV_API_KEY) as info:
        OpenAIEnhancer.from_env(env)
    assert KEY not in str(info.value)
    with FakeServer(echo_caption) as server:
        url = server.url.replace("http://", f"http://user:{KEY}@")
        enh = OpenAIEnhancer.from_env(env_for(url, **{E.ENV_API_KEY: "other-key"}))
        enh.enhance(["p"])
        assert KEY not in json.dumps(enh.provenance())
    assert server.requests[0][1]["Authorization"] == "Bearer other-key"


def test_openai_refused_key_is_a_clear_error_without_the_key() -> None:
    def refuse(body: dict, n: int) -> tuple[int, dict]:
        return 401, {"error": {"message": f"invalid key {KEY}"}}

    with FakeServer(refuse) as server:
        enh = OpenAIEnhancer.from_env(env_for(server.url))
        with pytest.raises(EnhancerError, match=E.ENV_API_KEY) as info:
            enh.enhance(["p"])
    assert KEY not in str(info.value)
    assert len(server.requests) == 1  # a refused key is not retried


def test_openai_retries_429_and_5xx_then_succeeds() -> None:
    script = [(429, {"error": {"message": "slow down"}}), (503, {}), (200, completion("ok"))]
    sleeps: list[float] = []
    with FakeServer(lambda body, n: script[n]) as server:
        enh = OpenAIEnhancer.from_env(env_for(server.url), sleep=sleeps.append, backoff_s=0.5)
        assert enh.enhance(["p"]) == ["ok"]
    assert len(server.requests) == 3
    assert sleeps == [0.5, 1.0]


def test_openai_gives_up_after_max_attempts() -> None:
    with FakeServer(lambda body, n: (500, {"error": {"message": "boom"}})) as server:
        enh = OpenAIEnhancer.from_env(env_for(server.url), sleep=lambda s: None, max_attempts=3)
        with pytest.raises(EnhancerError, match=r"failed 3 attempts; last: HTTP 500: .*boom"):
            enh.enhance(["p"])
    assert len(server.requests) == 3


def test_openai_unreachable_server() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    enh = OpenAIEnhancer.from_env(
        env_for(f"http://127.0.0.1:{port}/v1"), sleep=lambda s: None, max_attempts=2
    )
    with pytest.raises(EnhancerError, match=rf"cannot reach the server.*{E.ENV_BASE_URL}"):
        enh.enhance(["p"])


def test_openai_timeout_is_retried_then_reported() -> None:
    def slow(body: dict, n: int) -> tuple[int, dict]:
        time.sleep(0.3)
        return 200, completion("late")

    with FakeServer(slow) as server:
        enh = OpenAIEnhancer.from_env(
            env_for(server.url), timeout_s=0.05, max_attempts=2, sleep=lambda s: None
        )
        with pytest.raises(EnhancerError, match=r"failed 2 attempts; last: .*timed out"):
            enh.enhance(["p"])
    assert len(server.requests) == 2


def test_openai_empty_or_malformed_answer(caplog: pytest.LogCaptureFixture) -> None:
    with FakeServer(lambda body, n: (200, completion("  \n"))) as server:
        enh = OpenAIEnhancer.from_env(env_for(server.url))
        with caplog.at_level(logging.WARNING, logger="trainers.enhance"):
            assert enh.enhance(["red ball"]) == ["red ball"]
    assert "returned nothing" in caplog.text
    with FakeServer(lambda body, n: (200, {"nope": 1})) as server:
        enh = OpenAIEnhancer.from_env(env_for(server.url))
        with pytest.raises(EnhancerError, match="malformed chat completion"):
            enh.enhance(["p"])


# --------------------------------------------------------------------------------------------
# transformers: tiny random models saved with save_pretrained


def _tokenizer():
    from tests.tokenizers_util import byte_bpe_tokenizer

    return byte_bpe_tokenizer()


def save_gpt2(directory: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _tokenizer()
    if chat_template:
        tok.chat_template = chat_template
    config = GPT2Config(
        vocab_size=len(tok), n_positions=1024, n_embd=16, n_layer=1, n_head=2,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def save_t5(directory: Path, seed: int = 0) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _tokenizer()
    config = T5Config(
        vocab_size=len(tok), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_decoder_layers=1,
        num_heads=2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def test_transformers_causal_is_deterministic_and_versioned(tmp_path: Path) -> None:
    path = save_gpt2(tmp_path / "gpt2")
    cfg = {"backend": "transformers", "path": str(path), "max_new_tokens": 8}
    a, b = build_enhancer(cfg), build_enhancer(cfg)
    assert isinstance(a, TransformersEnhancer) and isinstance(b, TransformersEnhancer)
    prompts = ["red ball", "blue box on white"]
    out = a.enhance(prompts)
    assert out == b.enhance(prompts) == a.enhance(prompts)
    assert all(isinstance(o, str) and o and "\n" not in o for o in out)
    prov = a.provenance()
    assert json.loads(json.dumps(prov)) == prov
    assert prov["architecture"] == "causal"
    assert prov == b.provenance()
    other_tokens = build_enhancer({**cfg, "max_new_tokens": 9})
    other_instruction = build_enhancer({**cfg, "instruction": "Rewrite:"})
    assert other_tokens is not None and other_instruction is not None
    assert other_tokens.provenance()["version"] != prov["version"]
    assert other_instruction.provenance()["version"] != prov["version"]
    save_gpt2(path, seed=1)  # new weights in the same directory
    changed = build_enhancer(cfg)
    assert changed is not None
    assert changed.provenance()["version"] != prov["version"]


def test_transformers_causal_decodes_only_new_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enh = TransformersEnhancer(save_gpt2(tmp_path / "gpt2"), max_new_tokens=4)
    seen: dict[str, torch.Tensor] = {}
    real = enh.tokenizer.decode

    def decode(ids: torch.Tensor, **kw: object) -> str:
        seen["ids"] = ids
        return real(ids, **kw)

    monkeypatch.setattr(enh.tokenizer, "decode", decode)
    enh.enhance(["red ball"])
    assert 1 <= len(seen["ids"]) <= 4  # the answer only, not the echoed instruction


def test_transformers_uses_the_chat_template(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<<assistant>> {% endif %}"
    )
    enh = TransformersEnhancer(save_gpt2(tmp_path / "chat", chat_template=template))
    text = enh._input_text("red ball")
    assert text.startswith("<<user>> ") and text.endswith("<<assistant>> ")
    assert "Prompt: red ball" in text


def test_transformers_seq2seq(tmp_path: Path) -> None:
    path = save_t5(tmp_path / "t5")
    a = TransformersEnhancer(path, max_new_tokens=6)
    assert a.provenance()["architecture"] == "seq2seq"
    out = a.enhance(["red ball"])
    assert out == TransformersEnhancer(path, max_new_tokens=6).enhance(["red ball"])
    assert len(out) == 1 and out[0]


def test_transformers_empty_answer_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    enh = TransformersEnhancer(save_gpt2(tmp_path / "gpt2"), max_new_tokens=2)
    monkeypatch.setattr(enh, "_generate", lambda prompt: " \n \n")
    with caplog.at_level(logging.WARNING, logger="trainers.enhance"):
        assert enh.enhance(["red ball"]) == ["red ball"]
    assert "returned nothing" in caplog.text


def test_transformers_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(EnhancerError, match=r"not a directory"):
        TransformersEnhancer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EnhancerError, match=r"empty has no config.json"):
        TransformersEnhancer(tmp_path / "empty")
    path = save_gpt2(tmp_path / "broken")
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EnhancerError, match=r"cannot load the prompt-enhancer model at .*broken"):
        TransformersEnhancer(path)


def test_attribute_names_cover_every_head(shapes: ShapesEnhancer) -> None:
    assert tuple(shapes.net().heads) == ATTRIBUTE_NAMES
