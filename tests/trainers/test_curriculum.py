"""Curriculum learning in the flow trainer (``curriculum:``, trainers/curriculum.py): stages
switch resolution, caption detail and the resolution-dependent shift at their start steps, a
run resumed in the middle of a stage equals an uninterrupted one, bad stages are refused with
the key path, and samples / evaluation / export stay at data.resolution with the shift they
record as a number (``sample.shift: flux`` / ``auto``, ``generate(shift="flux")``)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainers.trainer_utils import config
from trainers.config import ConfigError, parse_config
from trainers.curriculum import Stage, downsample, partial_captions, pixels_seen, stage_at, stages
from trainers.data.shapes import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    ShapeAttrs,
    caption_vocabulary,
    parse_caption,
    partial_caption,
)
from trainers.rundir import RunDir, read_jsonl
from trainers.timesteps import flux_mu
from trainers.train import Dist, FlowTrainer

CURRICULUM = [
    {"start": 0, "resolution": 8, "caption_attributes": 2},
    {"start": 4, "resolution": 8, "caption_attributes": 4},
    {"start": 7},
]


def _cfg(**overrides: Any) -> dict[str, Any]:
    base = {
        "model": {"backbone": "sd3", "preset": "micro"},
        "timesteps": {"sampler": "logit_normal", "shift": "flux"},
        "train": {"steps": 10, "batch_size": 8, "log_every": 1, "checkpoint_every": 1000},
        "curriculum": CURRICULUM,
    }
    return config(**(base | overrides))


def _trainer(tmp: Path, cfg: dict[str, Any]) -> FlowTrainer:
    run = RunDir(tmp)
    run.create()
    return FlowTrainer(parse_config(cfg), run, Dist())


def _n_named(caption: str) -> int:
    """How many of the five attributes a (partial) shapes caption names."""
    words = caption.split()
    n = 1  # the shape noun
    n += sum(w in ATTRIBUTES["size"] or w in ATTRIBUTES["colour"] for w in words[1:3])
    n += "in" in words
    n += "background" in words
    return n


# -- captions ---------------------------------------------------------------------------------


def test_partial_caption_keeps_the_full_captions_order_and_wording() -> None:
    a = ShapeAttrs("circle", "red", "large", "top left", "white")
    assert partial_caption(a, ATTRIBUTE_NAMES) == a.caption
    assert partial_caption(a, ["shape"]) == "a circle"
    assert partial_caption(a, ["colour", "shape"]) == "a red circle"
    assert partial_caption(a, ["background", "size"]) == "a large circle on a white background"
    assert partial_caption(a, ["position"]) == "a circle in the top left"
    center = ShapeAttrs("square", "blue", "small", "center", "black")
    assert partial_caption(center, ["position", "colour"]) == "a blue square in the center"
    with pytest.raises(ValueError, match="unknown attribute"):
        partial_caption(a, ["texture"])


def test_every_partial_caption_is_a_subsequence_of_the_full_one_in_the_vocabulary() -> None:
    vocab = set(caption_vocabulary())
    others = [n for n in ATTRIBUTE_NAMES if n != "shape"]
    for values in itertools.islice(itertools.product(*ATTRIBUTES.values()), 0, None, 7):
        attrs = ShapeAttrs(**dict(zip(ATTRIBUTE_NAMES, values, strict=True)))
        full = attrs.caption.split()
        for k in range(5):
            for subset in itertools.combinations(others, k):
                words = partial_caption(attrs, ["shape", *subset]).split()
                assert set(words) <= vocab
                it = iter(full)
                assert all(w in it for w in words), (words, full)  # same order as the full one
                assert _n_named(" ".join(words)) == k + 1


def test_partial_captions_name_k_attributes_from_their_own_stream() -> None:
    captions = [
        "a large purple triangle in the top right on a white background",
        "",
        "a small red circle in the center on a gray background",
    ] * 20
    for k in range(1, 6):
        out = partial_captions(captions, k, torch.Generator().manual_seed(1))
        assert out == partial_captions(captions, k, torch.Generator().manual_seed(1))
        for full, part in zip(captions, out, strict=True):
            if not full:
                assert part == ""
                continue
            assert _n_named(part) == k
            # The attributes it names are the image's.
            assert parse_caption(full).shape in part.split()
    assert partial_captions(captions, 5, torch.Generator()) == captions
    a = partial_captions(captions, 3, torch.Generator().manual_seed(1))
    b = partial_captions(captions, 3, torch.Generator().manual_seed(2))
    assert a != b  # the subsets are drawn, not fixed
    assert len({c for c in a if c.startswith("a ") and "purple" in c}) <= 6
    with pytest.raises(ConfigError, match=r"data.kind shapes"):
        partial_captions(["a photo of a cat"], 2, torch.Generator())


# -- stages -----------------------------------------------------------------------------------


def test_stages_resolve_defaults_and_steps() -> None:
    cfg = parse_config(_cfg())
    st = stages(cfg)
    assert st == [Stage(0, 0, 4, 8, 2), Stage(1, 4, 7, 8, 4), Stage(2, 7, 10, 16, None)]
    assert [stage_at(st, k).index for k in range(10)] == [0] * 4 + [1] * 3 + [2] * 3
    assert pixels_seen(st, 0, 8) == 0
    assert pixels_seen(st, 5, 8) == 5 * 8 * 64
    assert pixels_seen(st, 10, 8) == 7 * 8 * 64 + 3 * 8 * 256
    none = stages(parse_config(config()))
    assert none == [Stage(0, 0, 30, 16, None)]


def test_downsample_is_an_area_mean() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert downsample(x, 4) is x
    torch.testing.assert_close(
        downsample(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]], dtype=torch.float32)
    )


def test_no_curriculum_leaves_the_config_hash_unchanged() -> None:
    cfg = parse_config(config())
    assert "curriculum" not in cfg.to_dict()
    assert parse_config(config(curriculum=[])).hash() == cfg.hash()
    assert parse_config(_cfg()).to_dict()["curriculum"][0]["resolution"] == 8


BAD = {
    "first start": ([{"start": 2}], "curriculum.0.start must be 0"),
    "not increasing": (
        [{"start": 0}, {"start": 5}, {"start": 5}],
        "curriculum.2.start 5 must be larger than curriculum.1.start 5",
    ),
    "past the end": ([{"start": 0}, {"start": 10}], "curriculum.1.start 10 must be below"),
    "above data": ([{"start": 0, "resolution": 32}], "curriculum.0.resolution 32 is above"),
    "too many attributes": (
        [{"start": 0, "caption_attributes": 6}],
        "curriculum.0.caption_attributes 6 must be at most 5",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_curricula_are_refused_with_the_key_path(case: str) -> None:
    stages_, message = BAD[case]
    with pytest.raises(ConfigError, match=message):
        parse_config(_cfg(curriculum=stages_))


def test_latent_data_and_folder_data_limits() -> None:
    with pytest.raises(ConfigError, match=r"curriculum.1.resolution 8 below .* data.vae"):
        parse_config(
            _cfg(
                data={"kind": "shapes", "resolution": 16, "vae": "some/vae"},
                curriculum=[{"start": 0}, {"start": 3, "resolution": 8}],
            )
        )
    # Full resolution with a VAE is fine.
    parse_config(_cfg(data={"vae": "some/vae"}, curriculum=[{"start": 0, "resolution": 16}]))
    with pytest.raises(ConfigError, match=r"curriculum.0.caption_attributes needs data.kind"):
        parse_config(
            _cfg(
                data={"kind": "folder", "path": "x", "resolution": 16},
                curriculum=[{"start": 0, "caption_attributes": 2}],
            )
        )


@pytest.mark.parametrize(
    ("backbone", "resolution", "message"),
    [("sd3", 10, "patch size 4"), ("pixart", 12, "patch size 8"), ("unet", 10, "UNet's two")],
)
def test_resolution_the_backbone_cannot_take_is_refused(
    tmp_path: Path, backbone: str, resolution: int, message: str
) -> None:
    overrides = {"patch_size": 8} if backbone == "pixart" else {}
    cfg = _cfg(
        model={"backbone": backbone, "preset": "micro", "overrides": overrides},
        curriculum=[{"start": 0, "resolution": resolution}, {"start": 5}],
    )
    with pytest.raises(ConfigError, match=f"curriculum.0.resolution {resolution} .*{message}"):
        _trainer(tmp_path, cfg)


# -- the trainer ------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["sd3", "unet", "pixart"])
def test_stages_switch_resolution_captions_and_shift_at_their_steps(
    tmp_path: Path, backbone: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = _trainer(tmp_path, _cfg(model={"backbone": backbone, "preset": "micro"}))
    seen: list[tuple[int, list[str], float]] = []
    model = trainer.model

    def recording(x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        seen.append((x.shape[-1], list(captions), trainer.shift))
        return model(x, t, captions)

    trainer.model = recording  # type: ignore[assignment]
    trainer.fit()
    assert len(seen) == 10
    sides = [side for side, _, _ in seen]
    assert sides == [8] * 7 + [16] * 3
    counts = [{_n_named(c) for c in caps if c} for _, caps, _ in seen]
    assert counts == [{2}] * 4 + [{4}] * 3 + [{5}] * 3
    # The shift follows the stage's token count: (8 / p)^2 or (16 / p)^2 tokens (p = 4 for the
    # micro transformers; the UNet counts pixels).
    patch = None if backbone == "unet" else 4
    tokens = {r: (r // (patch or 1)) ** 2 for r in (8, 16)}
    tcfg = trainer.cfg.timesteps
    expected = [math.exp(flux_mu(tcfg, tokens[side])) for side in sides]
    assert [s for _, _, s in seen] == pytest.approx(expected)
    assert expected[0] != pytest.approx(expected[-1])
    # The full captions in the last stage are the data's own.
    idx, drop = trainer.draw_batch(9)
    assert seen[9][1] == [
        "" if d else trainer.data.captions[i]
        for i, d in zip(idx.tolist(), drop.tolist(), strict=True)
    ]
    # Logged: stage, resolution, shift and the cumulative compute per step; a line per stage.
    metrics = read_jsonl(trainer.run.metrics)
    by = {(m["step"], m["name"]): m["value"] for m in metrics}
    assert [by[(k, "train/curriculum_stage")] for k in range(1, 11)] == [0] * 4 + [1] * 3 + [2] * 3
    assert [by[(k, "train/resolution")] for k in range(1, 11)] == sides
    assert [by[(k, "train/shift")] for k in range(1, 11)] == pytest.approx(expected)
    assert by[(10, "train/pixels_seen")] == 7 * 8 * 64 + 3 * 8 * 256
    assert by[(10, "train/tokens_seen")] == 7 * 8 * tokens[8] + 3 * 8 * tokens[16]
    out = capsys.readouterr().out
    for line in ("stage 0 (steps 0 to 3) at step 0", "stage 1 (steps 4 to 6) at step 4"):
        assert line in out
    assert "stage 2 (steps 7 to 9) at step 7: resolution 16, caption attributes all" in out
    assert "warning" not in out


def _fit_until(trainer: FlowTrainer, stop_at: int | None) -> None:
    """fit(), stopped like a SIGTERM after step ``stop_at`` (checkpoint saved)."""
    if stop_at is not None:
        step = trainer.train_step

        def stepping() -> tuple[float, float]:
            out = step()
            trainer.stop_requested = trainer.step >= stop_at
            return out

        trainer.train_step = stepping  # type: ignore[method-assign]
    try:
        trainer.fit()
    except KeyboardInterrupt:
        trainer.save_checkpoint()


@pytest.mark.parametrize("stop_at", [2, 5])
def test_resume_mid_stage_equals_an_uninterrupted_run(tmp_path: Path, stop_at: int) -> None:
    """Stopped inside stage 0 (step 2) or stage 1 (step 5), resumed through the next stage(s):
    the same losses and weights as without the stop."""
    cfg = _cfg()
    reference = _trainer(tmp_path / "reference", cfg)
    _fit_until(reference, None)
    first = _trainer(tmp_path / "stopped", cfg)
    _fit_until(first, stop_at)
    assert first.step == stop_at
    resumed = _trainer(tmp_path / "stopped", cfg)
    assert resumed.try_resume() and resumed.step == stop_at
    assert resumed.stage == stage_at(resumed.stages, stop_at)
    assert resumed.shift == pytest.approx(reference.shift_at(resumed.stage.resolution))
    resumed.fit()

    def losses(t: FlowTrainer) -> list[tuple[int, float]]:
        return [
            (m["step"], m["value"]) for m in read_jsonl(t.run.metrics) if m["name"] == "train/loss"
        ]

    assert [s for s, _ in losses(resumed)] == list(range(1, 11))
    assert [v for _, v in losses(resumed)] == pytest.approx(
        [v for _, v in losses(reference)], rel=1e-5
    )
    ref_state, res_state = reference.net.state_dict(), resumed.net.state_dict()
    for k in ref_state:
        torch.testing.assert_close(res_state[k], ref_state[k], rtol=1e-5, atol=1e-6)


def test_the_caption_stream_leaves_the_other_draws_alone(tmp_path: Path) -> None:
    """With and without caption detail, a step draws the same batch, t and noise (the caption
    subsets come from their own stream), so the two configurations stay paired."""
    plain = _trainer(tmp_path / "plain", _cfg(curriculum=[{"start": 0, "resolution": 8}]))
    detail = _trainer(
        tmp_path / "detail",
        _cfg(curriculum=[{"start": 0, "resolution": 8, "caption_attributes": 1}]),
    )
    outs = []
    for t in (plain, detail):
        with torch.no_grad():
            out, x0 = t.flow_loss()
        outs.append((out, x0))
    (a, xa), (b, xb) = outs
    assert torch.equal(xa, xb) and torch.equal(a.u, b.u) and torch.equal(a.eps, b.eps)
    assert torch.equal(a.t, b.t)
    assert a.loss != b.loss  # the captions did differ


def test_last_stage_below_data_resolution_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(
        train={"steps": 2, "batch_size": 8, "log_every": 1, "checkpoint_every": 1000},
        curriculum=[{"start": 0, "resolution": 8}],
    )
    trainer = _trainer(tmp_path, cfg)
    trainer.fit()
    assert "warning: the last curriculum stage trains at 8 px" in capsys.readouterr().out
    # Sampling still happens at data.resolution, with the shift of that resolution.
    assert trainer.data.sample_shape[-1] == 16
    assert trainer.sample_shift == pytest.approx(math.exp(flux_mu(trainer.cfg.timesteps, 16)))
    assert trainer.shift == pytest.approx(math.exp(flux_mu(trainer.cfg.timesteps, 4)))


# -- the shift at sampling time ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "expected"),
    [("flux", lambda t: math.exp(flux_mu(t, 16))), ("auto", lambda t: 16 / 32), (2.0, None)],
)
def test_sample_shift_rules_resolve_at_data_resolution(
    tmp_path: Path, rule: Any, expected: Any
) -> None:
    cfg = _cfg(
        timesteps={"sampler": "logit_normal", "shift": 1.0},
        sample={"steps": 2, "num_prompts": 2, "seeds": [0], "shift": rule},
        curriculum=[],
    )
    trainer = _trainer(tmp_path, cfg)
    value = expected(trainer.cfg.timesteps) if expected else rule
    assert trainer.shift == 1.0
    assert trainer.sample_shift == pytest.approx(value)
    trainer.save_samples("x")
    manifest = read_jsonl(trainer.run.root / "samples" / "manifest.jsonl")
    assert manifest and [r["shift"] for r in manifest] == pytest.approx([value] * len(manifest))
    assert all(isinstance(r["shift"], float) for r in manifest)
    trainer.export()
    meta = json.loads((trainer.run.final / "harness.json").read_text())
    assert meta["shift"] == 1.0  # the training shift, generate()'s default
    if isinstance(rule, str):
        assert meta["sample_shift"] == pytest.approx(value)
    else:
        assert "sample_shift" not in meta
    assert "curriculum" not in meta


def test_export_generate_accepts_flux_and_auto(tmp_path: Path) -> None:
    from trainers.export import load_export

    cfg = _cfg(
        model={"backbone": "sd3", "preset": "micro"},
        timesteps={"sampler": "logit_normal", "shift": "flux", "base_resolution": 8},
        curriculum=[{"start": 0, "resolution": 8}, {"start": 5}],
    )
    trainer = _trainer(tmp_path, cfg)
    trainer.export()
    meta = json.loads((trainer.run.final / "harness.json").read_text())
    tcfg = trainer.cfg.timesteps
    flux16 = math.exp(flux_mu(tcfg, 16))  # (16 / 4)^2 tokens at data.resolution
    assert meta["shift"] == pytest.approx(flux16) and isinstance(meta["shift"], float)
    # Each stage's training shift is recorded: (8 / 4)^2 = 4 tokens, then 16.
    assert [(s["resolution"], s["shift"]) for s in meta["curriculum"]] == [
        (8, pytest.approx(math.exp(flux_mu(tcfg, 4)))),
        (16, pytest.approx(flux16)),
    ]
    model = load_export(trainer.run.final)
    assert model.resolve_shift("flux") == pytest.approx(flux16)
    assert model.resolve_shift("auto") == pytest.approx(2.0)  # sqrt(16^2 / 8^2)
    assert model.resolve_shift(None) == pytest.approx(flux16)
    assert model.resolve_shift(1.5) == 1.5
    a = model.generate(["a red circle"], [0], steps=2, shift="auto")
    b = model.generate(["a red circle"], [0], steps=2, shift=2.0)
    c = model.generate(["a red circle"], [0], steps=2, shift=1.0)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="'auto' or 'flux'"):
        model.generate(["a red circle"], [0], steps=2, shift="sd3")
