"""The rewards evaluators provide to preference tuning (evaluators/rewards.py): CLIP score and a
CLIP-architecture preference model against an independent computation (the processor, by
hand), gradients, errors and provenance; the MLLM judge's rating with a scripted judge server on
loopback, and that no credential leaks; each reachable by name through its entry point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from evaluators.extractors import _clip_weights_sha256, load_clip
from evaluators.image_metrics import clip_score
from evaluators.mllm_backends import LoopbackChatServer, RecordedRequest, Reply
from evaluators.rewards import ClipReward, JudgeReward, MemoryJudgmentCache, ModelReward
from evaluators.sinks import JudgmentCache
from tests.evaluators.metric_nets import write_tiny_clip
from trainers.data.shapes import ShapesDataset, to_model_range, to_uint8
from trainers.preference.rewards import RewardError, RewardSettings, build_reward, reward_class

KEY = "sk-reward-test-7d41c9e0"  # distinctive: searched for in provenance and errors


def shapes(size: int = 6, seed: int = 3) -> tuple[torch.Tensor, ShapesDataset]:
    """Real rendered images of the embedded data (float, [-1, 1], 32 px) and their data set."""
    ds = ShapesDataset(seed=seed, split="val", size=size)
    return to_model_range(ds.images), ds


def test_every_provided_reward_is_an_entry_point() -> None:
    """The names the config allows beyond the built-in ones load through their entry points."""
    from typing import get_args

    from trainers.preference.rewards import REWARDS, RewardName

    provided = set(get_args(RewardName)) - set(REWARDS)
    assert provided == {"clip", "model", "judge"}
    assert reward_class("clip") is ClipReward and reward_class("model") is ModelReward
    assert reward_class("judge") is JudgeReward
    with pytest.raises(RewardError, match="unknown reward 'nope'"):
        reward_class("nope")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Seed 1: cosines of the shapes images with their captions are of both signs, so the CLIP
    # score's max(., 0) is exercised and some scores have gradients.
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", seed=1)


# -- registry and settings -----------------------------------------------------------------------
def clip_reference(directory: Path, images_uint8: torch.Tensor, prompts: list[str]):
    """Unit image and text embeddings through the CLIPProcessor's own preprocessing of PIL
    images (already at the model's image size, so the processor does not resize them)."""
    model, processor = load_clip(directory)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images_uint8]
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    return cos, model


def test_clip_matches_the_processor_and_torchmetrics(tiny_clip: Path) -> None:
    x, ds = shapes(6)
    reward = build_reward(RewardSettings(name="clip", path=str(tiny_clip)), "cpu")
    assert isinstance(reward, ClipReward) and reward.image_size == 32 == x.shape[-1]
    value = reward(x, ds.captions)
    u8 = to_uint8(x)
    cos, _ = clip_reference(tiny_clip, u8, ds.captions)
    expected = 100 * cos.clamp(min=0)
    assert (expected == 0).any() and (expected > 0).any()  # both sides of the max
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-4)
    # torchmetrics' CLIPScore (the harness's clip_score metric) takes the max with 0 of the
    # batch mean, not of each image's score: compare it with the unclamped cosines' mean.
    model, processor = load_clip(tiny_clip)
    metric = clip_score(model, processor, u8, ds.captions)
    assert metric == pytest.approx(max(100 * cos.mean().item(), 0.0), rel=1e-4)
    assert metric > 0 and value.mean().item() >= metric


def test_clip_gradients_flow_through_the_resize(tiny_clip: Path) -> None:
    x, ds = shapes(6)
    reward = build_reward(RewardSettings(name="clip", path=str(tiny_clip)), "cpu")
    big = torch.nn.functional.interpolate(x, size=(48, 48), mode="nearest")
    images = big.clone().requires_grad_(True)
    value = reward(images, ds.captions)
    value.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    positive = value.detach() > 0
    assert positive.any()
    per_image = images.grad.abs().flatten(1).sum(1)
    assert (per_image[positive] > 0).all() and (per_image[~positive] == 0).all()
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_model_is_pickscore_formula(tiny_clip: Path) -> None:
    x, ds = shapes(6)
    reward = build_reward(RewardSettings(name="model", path=str(tiny_clip), scale=3.0), "cpu")
    assert isinstance(reward, ModelReward) and reward.differentiable
    images = x.clone().requires_grad_(True)
    value = reward(images, ds.captions)
    cos, model = clip_reference(tiny_clip, to_uint8(x), ds.captions)
    expected = 3.0 * model.logit_scale.exp() * cos
    torch.testing.assert_close(value.detach(), expected, rtol=1e-4, atol=1e-4)
    value.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert (images.grad.abs().flatten(1).sum(1) > 0).all()

    prov = reward.provenance()
    json.dumps(prov)
    assert prov["name"] == "model" and prov["scale"] == 3.0
    assert prov["weights_sha256"] == _clip_weights_sha256(tiny_clip)
    clip_prov = build_reward(RewardSettings(name="clip", path=str(tiny_clip)), "cpu").provenance()
    assert clip_prov["weights_sha256"] == prov["weights_sha256"]
    assert clip_prov["score"] != prov["score"]


def test_model_needs_a_model_directory(tmp_path: Path) -> None:
    with pytest.raises(RewardError, match=r"reward 'model' needs path.*PickScore"):
        build_reward(RewardSettings(name="model"), "cpu")
    with pytest.raises(RewardError, match="does not exist"):
        build_reward(RewardSettings(name="model", path=str(tmp_path / "nope")), "cpu")
    with pytest.raises(RewardError, match=r"has no config\.json"):
        build_reward(RewardSettings(name="model", path=str(tmp_path)), "cpu")


def test_text_embeddings_are_remembered_and_usable_with_autograd(tiny_clip: Path) -> None:
    x, ds = shapes(2)
    reward = build_reward(RewardSettings(name="clip", path=str(tiny_clip)), "cpu")
    with torch.inference_mode():
        first = reward(x, ds.captions)
    images = x.clone().requires_grad_(True)
    again = reward(images, ds.captions)  # the remembered embeddings, now in autograd
    again.sum().backward()
    torch.testing.assert_close(first, again.detach())


# -- judge ---------------------------------------------------------------------------------------
RATINGS = {"good": (9, 8), "bad": (2, 3)}


def rate_by_prompt(request: RecordedRequest, n: int) -> Reply:
    """Absolute ratings from the prompt the request quotes ("good" or "bad")."""
    name = "good" if '"good"' in request.text() else "bad"
    adherence, quality = RATINGS[name]
    answer = {"prompt_adherence": adherence, "visual_quality": quality, "reasons": name}
    return Reply(json.dumps(answer))


def judge_env(url: str) -> dict[str, str]:
    return {
        "HARNESS_JUDGE_BASE_URL": url,
        "HARNESS_JUDGE_MODEL": "tiny-vlm",
        "HARNESS_JUDGE_API_KEY": KEY,
    }


def test_judge_scores_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    x, _ = shapes(3)
    images = x.clone().requires_grad_(True)
    with LoopbackChatServer(rate_by_prompt) as server:
        for name, value in judge_env(server.url).items():
            monkeypatch.setenv(name, value)
        reward = build_reward(RewardSettings(name="judge", scale=0.1), "cpu")
        value = reward(images, ["good", "bad", "good"])
        assert len(server.requests) == 3
        assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"
        again = reward(images, ["good", "bad", "good"])
        assert len(server.requests) == 3  # the same images and prompts: answered from memory
    assert isinstance(reward, JudgeReward) and not reward.differentiable
    torch.testing.assert_close(value, torch.tensor([0.85, 0.25, 0.85]))
    assert not value.requires_grad and torch.equal(value, again)

    prov = reward.provenance()
    text = json.dumps(prov)
    assert KEY not in text and "sk-" not in text
    assert prov["model"] == "tiny-vlm" and prov["rubric_version"] and prov["scale"] == 0.1
    assert prov["host"] == server.url.split("//")[1].split("/")[0]


def test_judge_never_leaks_url_credentials() -> None:
    with LoopbackChatServer(rate_by_prompt) as server:
        url = server.url.replace("http://", "http://user:secret@")
        reward = JudgeReward(RewardSettings(name="judge"), "cpu", env=judge_env(url))
        x, _ = shapes(1)
        assert reward(x, ["good"]).item() == 8.5
        text = json.dumps(reward.provenance()) + repr(reward)
        assert "secret" not in text and "user" not in text and KEY not in text
        assert reward.provenance()["host"].startswith("127.0.0.1:")

    # A refused route: the backend's message names the base URL; the reward's does not leak it.
    with LoopbackChatServer(lambda r, n: Reply(status=404, error="no model")) as server:
        url = server.url.replace("http://", "http://user:secret@")
        reward = JudgeReward(RewardSettings(name="judge"), "cpu", env=judge_env(url))
        with pytest.raises(RewardError) as err:
            reward(x, ["good"])
    assert "127.0.0.1" in str(err.value) and "secret" not in str(err.value)
    assert KEY not in str(err.value) and err.value.__cause__ is None


def test_judge_without_an_answer_is_an_error() -> None:
    def flaky(request: RecordedRequest, n: int) -> Reply:
        if '"bad"' in request.text():
            return Reply(status=502, error=f"bad gateway for {KEY}")
        return rate_by_prompt(request, n)

    x, _ = shapes(3)
    with LoopbackChatServer(flaky) as server:
        url = server.url.replace("http://", "http://user:secret@")
        env = judge_env(url)
        reward = JudgeReward(RewardSettings(name="judge"), "cpu", env=env, max_attempts=1)
        with pytest.raises(RewardError, match="no usable rating for 2 of 3 images") as err:
            reward(x, ["bad", "good", "bad"])
    assert "secret" not in str(err.value) and KEY not in str(err.value)

    with LoopbackChatServer(lambda r, n: Reply("I like it.")) as server:
        reward = JudgeReward(RewardSettings(name="judge"), "cpu", env=judge_env(server.url))
        with pytest.raises(RewardError, match=r"1 of 1 images.*unparseable"):
            reward(x[:1], ["good"])


def test_judge_needs_a_server() -> None:
    with pytest.raises(RewardError, match="HARNESS_JUDGE_BASE_URL"):
        JudgeReward(RewardSettings(name="judge"), "cpu", env={})
    with pytest.raises(RewardError, match=r"no config\.json"):
        JudgeReward(RewardSettings(name="judge", path="/no/such/vlm"), "cpu", env={})


def test_memory_judgment_cache() -> None:
    cache = MemoryJudgmentCache(max_rows=2)
    assert isinstance(cache, JudgmentCache)

    def row(key: str, t: float, result: dict | None) -> dict:
        return {
            "judgment_key": key, "judge": "openai", "model": "m", "mode": "absolute",
            "rubric_version": "v1", "prompt": "p", "images": ["s"], "parsed": result is not None,
            "result": result, "time": t, "raw": "{}",
        }  # fmt: skip

    cache.upsert_judgments([row("a", 2.0, {"x": 1}), row("b", 1.0, None)])
    cache.upsert_judgments([row("a", 3.0, {"x": 2})], replace=False)  # kept
    stored = cache.cached_judgments(["a", "z"])
    assert stored == {"a": row("a", 2.0, {"x": 1}) | {"error": None, "latency_s": None}}
    assert [r["judgment_key"] for r in cache.judgments()] == ["b", "a"]  # time order
    cache.upsert_judgments([row("a", 3.0, {"x": 2})])  # replaced: now the newest row
    cache.upsert_judgments([row("c", 4.0, None)])  # past max_rows: the oldest row goes
    assert cache.cached_judgments(["a", "b", "c"]).keys() == {"a", "c"}
    assert cache.cached_judgments(["a"])["a"]["result"] == {"x": 2}
    assert cache.judgments(model="other") == []
