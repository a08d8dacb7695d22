"""The fine-tuning trainer (``python -m trainers.finetune``) on a tiny finished flow run: LoRA
trains only its adapters and leaves the base untouched; the adapter saves and loads onto its
base with identical outputs, and the merged export matches it; the prior-preservation loss on a
hand-worked case; subset selection; resume equals uninterrupted; every method end to end as a
process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from tests.trainers.trainer_utils import REPO, config, env, run_trainer
from trainers.config import ConfigError, parse_config
from trainers.errors import DataError
from trainers.export import load_export, state_dict_hash
from trainers.finetune.config import Method, parse_finetune_config
from trainers.finetune.lora import load_adapter, merged_copy, save_adapter
from trainers.finetune.methods import METHODS, dreambooth_loss, select_subset
from trainers.finetune.train import FinetuneTrainer, with_words
from trainers.flow import FlowGenerators
from trainers.rundir import RunDir
from trainers.train import Dist


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny flow run: the model every test fine-tunes."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cfg = config(train={"steps": 10}, eval={"every": 1000, "num_images": 4, "steps": 2})
    proc = run_trainer(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def ft_cfg(base: Path, method: str = "sft", **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "seed": 2,
        "init": str(base),
        "method": method,
        "subset": {"where": {"background": ["white"]}} if method == "sft" else {},
        "lora": {"rank": 4, "alpha": 8},
        "dreambooth": {"instances": 3, "eval_prompts": 4, "eval_seeds": [0]},
        "prior": {"weight": 1.0, "images": 8, "steps": 2},
        "train": {
            "steps": 4,
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 0,
            "log_every": 2,
            "checkpoint_every": 100,
        },
        "eval": {
            "every": 1000,
            "num_images": 4,
            "reference_images": 64,
            "loss_images": 0,
            "steps": 2,
        },
        "sample": {"num_prompts": 2, "seeds": [0], "steps": 2},
    }
    for k, v in kw.items():
        cfg[k] = cfg[k] | v if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def make(base: Path, run_dir: Path, method: str = "sft", **kw: Any) -> FinetuneTrainer:
    run = RunDir(run_dir)
    run.create()
    return FinetuneTrainer(parse_finetune_config(ft_cfg(base, method, **kw)), run, Dist())


def weights(module: torch.nn.Module) -> str:
    return state_dict_hash(module.state_dict())


def base_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base layer weights of a (possibly LoRA-injected) transformer, by base name."""
    return {
        k.replace(".base_layer.", "."): v.detach().clone()
        for k, v in transformer.state_dict().items()
        if "lora_" not in k
    }


def test_method_registry_names_the_config_values() -> None:
    assert tuple(METHODS) == get_args(Method)


def test_lora_trains_only_its_adapters_and_leaves_the_base_untouched(
    base: Path, tmp_path: Path
) -> None:
    tr = make(base, tmp_path / "run")
    start = load_export(base / "final").denoiser.transformer.state_dict()
    trainable = dict(tr.net.denoiser.named_parameters())
    assert tr.trainable_names and all("lora_" in n for n in tr.trainable_names)
    assert not any(p.requires_grad for n, p in trainable.items() if "lora_" not in n)
    assert not any(p.requires_grad for p in tr.net.text_encoder.parameters())
    out = tr.flow_step()
    assert torch.isfinite(torch.tensor(out[0]))
    tr.flow_step()
    after = base_weights(tr.net.denoiser.transformer)
    assert after.keys() == start.keys()
    for k, v in start.items():
        assert torch.equal(after[k], v), k  # base weights bit-identical after two steps
    lora_b = [p for n, p in tr.net.denoiser.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters moved off their zero init
    # Gradients reach the adapters only (optimizer_step zeroes them before backward, so after
    # a step .grad holds that step's gradients).
    tr.flow_step()
    grads = {n for n, p in tr.net.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)


def test_adapter_round_trip_and_merged_export_match(base: Path, tmp_path: Path) -> None:
    tr = make(base, tmp_path / "run")
    for _ in range(3):
        tr.train_step()
    trained = tr.net.denoiser.eval()
    adapter_dir = tmp_path / "adapter"
    save_adapter(trained.transformer, adapter_dir, {"base": str(base / "final")})
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4

    fresh = load_export(base / "final").denoiser.eval()
    load_adapter(fresh.transformer, adapter_dir)
    merged = merged_copy(trained.transformer)
    assert not any("lora" in k for k in merged.state_dict())
    text = tr.net.encode(["a large red circle in the center on a white background"] * 2)
    x = torch.randn(2, *tr.data.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        want = trained(x, t, text)
        assert torch.equal(fresh(x, t, text), want)  # adapter round trip: identical
        torch.testing.assert_close(
            type(trained)(trained.backbone, merged)(x, t, text), want, atol=1e-5, rtol=1e-5
        )
        # And the adapter really changes the model (the test would pass vacuously otherwise).
        plain = load_export(base / "final").denoiser.eval()
        assert (plain(x, t, text) - want).abs().max() > 1e-4


def test_prior_preservation_loss_on_a_hand_worked_case() -> None:
    """predict = 0, so each term is mean((eps - x0)^2) over its own draws: with x0 = 1 for the
    instances and x0 = -2 for the class images, L = mean((eps_i - 1)^2) + w mean((eps_p + 2)^2)."""
    flow = parse_config({"timesteps": {"sampler": "uniform"}})
    x_i, x_p = torch.ones(2, 3, 4, 4), torch.full((3, 3, 4, 4), -2.0)

    def gens(seed: int) -> FlowGenerators:
        return FlowGenerators(
            timesteps=torch.Generator().manual_seed(seed),
            noise=torch.Generator().manual_seed(seed + 100),
        )

    def zero(x: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        return torch.zeros_like(x)

    out = dreambooth_loss(
        zero, (x_i, ["a"] * 2), (x_p, ["b"] * 3), flow, 1.0, (gens(1), gens(2)), 0.5
    )
    eps_i = torch.randn(x_i.shape, generator=torch.Generator().manual_seed(101))
    eps_p = torch.randn(x_p.shape, generator=torch.Generator().manual_seed(102))
    inst = ((eps_i - 1.0) ** 2).mean()
    prior = ((eps_p + 2.0) ** 2).mean()
    torch.testing.assert_close(out.instance, inst)
    torch.testing.assert_close(out.prior, prior)
    torch.testing.assert_close(out.loss, inst + 0.5 * prior)
    off = dreambooth_loss(
        zero, (x_i, ["a"] * 2), (x_p, ["b"] * 3), flow, 1.0, (gens(1), gens(2)), 0
    )
    torch.testing.assert_close(off.loss, inst)


def test_subset_selection_and_its_errors(base: Path) -> None:
    flow = parse_config(config())
    from trainers.data.shapes import sample_attrs

    captions = [sample_attrs(0, "train", i).caption for i in range(256)]
    cfg = parse_finetune_config(ft_cfg(base, "sft"))
    keep = select_subset(cfg, flow, captions)
    assert keep and all(captions[i].endswith("white background") for i in keep)
    assert len(keep) == sum(c.endswith("white background") for c in captions)
    cfg = parse_finetune_config(
        ft_cfg(
            base, "sft", subset={"where": {}, "captions_containing": ["Large", "red"], "size": 3}
        )
    )
    keep = select_subset(cfg, flow, captions)
    assert len(keep) == 3 and all("large red" in captions[i] for i in keep)
    with pytest.raises(ConfigError, match="unknown attribute 'colour2'"):
        select_subset(
            parse_finetune_config(ft_cfg(base, "sft", subset={"where": {"colour2": ["red"]}})),
            flow,
            captions,
        )
    with pytest.raises(DataError, match="keeps no training image"):
        select_subset(
            parse_finetune_config(
                ft_cfg(base, "sft", subset={"where": {}, "captions_containing": ["zebra"]})
            ),
            flow,
            captions,
        )
    no_subset = ft_cfg(base, "sft")
    no_subset["subset"] = {}
    with pytest.raises(ConfigError, match="curated subset"):
        parse_finetune_config(no_subset)


def test_new_words_keep_every_old_embedding(base: Path) -> None:
    text = load_export(base / "final").text_encoder
    extended = with_words(text, ["sks"], seed=0)
    old = ["a large red circle in the center on a white background", ""]
    a, b = text(old), extended(old)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert extended.tokenize(["sks"])[0][0, 1] != 1  # no longer the unknown-word id
    assert not torch.equal(extended(["a sks"]).tokens, text(["a sks"]).tokens)
    assert with_words(extended, ["sks"], seed=0) is extended


@pytest.mark.parametrize("method", ["sft", "dreambooth"])
def test_resume_equals_uninterrupted(base: Path, tmp_path: Path, method: str) -> None:
    full = make(base, tmp_path / "full", method)
    for _ in range(4):
        full.train_step()
    part = make(base, tmp_path / "part", method)
    for _ in range(2):
        part.train_step()
    part.save_checkpoint()
    del part
    resumed = make(base, tmp_path / "part", method)
    assert resumed.try_resume() and resumed.step == 2
    for _ in range(2):
        resumed.train_step()
    assert weights(resumed.net.denoiser) == weights(full.net.denoiser)
    assert weights(resumed.ema_model()) == weights(full.ema_model())


def run_finetune(cfg: dict[str, Any], run_dir: Path) -> subprocess.CompletedProcess:
    cfg_path = run_dir.parent / f"{run_dir.name}.json"
    cfg_path.write_text(json.dumps(cfg))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "trainers.finetune",
            "--config",
            str(cfg_path),
            "--run-dir",
            str(run_dir),
        ],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_ct_with_rank_0_trains_every_backbone_weight_on_all_the_data(
    base: Path, tmp_path: Path
) -> None:
    tr = make(base, tmp_path / "run", "ct", lora={"rank": 0})
    assert len(tr.data.captions) == 256  # the starting run's data, whole
    names = [n for n, _ in tr.net.denoiser.named_parameters()]
    assert tr.trainable_names == [f"denoiser.{n}" for n in names]  # every backbone weight
    assert not any("lora" in n for n in names)
    before = weights(tr.net.denoiser)
    tr.train_step()
    assert weights(tr.net.denoiser) != before
    assert tr.export_denoiser(tr.ema_model()) is tr.ema_model().denoiser  # nothing to merge


@pytest.mark.parametrize("method,lora", [("sft", 4), ("dreambooth", 4)], ids=["sft-lora", "db"])
def test_each_method_end_to_end_as_a_process(
    base: Path, tmp_path: Path, method: str, lora: int
) -> None:
    """Trains, evaluates before and after (prior drift), samples and exports; the export
    regenerates the trainer's final samples; a LoRA run writes its adapter."""
    import numpy as np
    from PIL import Image

    from trainers.data.shapes import to_uint8

    run_dir = tmp_path / method
    cfg = ft_cfg(base, method, lora={"rank": lora}, eval={"every": 4})
    proc = run_finetune(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = RunDir(run_dir)
    assert run.read_status()["status"] == "ok"
    records = run.read_metrics()
    names = {r["name"] for r in records}
    assert {
        "train/loss",
        "domain_fid",
        "prior_drift/domain_fid",
        "prior_drift/attr_acc_mean",
    } <= names
    assert {r["step"] for r in records if r["name"] == "domain_fid"} == {0, 4}
    meta = json.loads((run.final / "harness.json").read_text())
    assert meta["finetune"]["method"] == method and meta["init"].endswith("final")
    assert (run.final / "lora" / "adapter_model.safetensors").is_file() == (lora > 0)
    if method == "dreambooth":
        assert {"subject/fidelity", "subject/prompt_fidelity", "train/prior_loss"} <= names
        assert (run.root / "finetune" / "class_images.pt").is_file()
    manifest = [json.loads(x) for x in run.manifest.read_text().splitlines()]
    final = [m for m in manifest if m["tag"] == "final"]
    model = load_export(run.final)
    m = final[0]
    img = model.generate([m["prompt"]], [m["seed"]], steps=2)
    saved = torch.from_numpy(np.array(Image.open(run.samples / m["path"])))
    assert torch.equal(to_uint8(img)[0].permute(1, 2, 0), saved)
    if method == "dreambooth":
        assert "sks" in final[0]["prompt"]  # the sample grid shows the subject
        # The fine-tuned export (merged LoRA, the text encoder that knows the token) opens with
        # plain diffusers and draws what the harness draws.
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(run.final), trust_remote_code=True)
        out = pipe([m["prompt"]], seeds=[m["seed"]], num_inference_steps=2, output_type="pt")
        torch.testing.assert_close(out.images, (img + 1) / 2, atol=1e-5, rtol=0)


def test_a_stopped_fine_tune_resumes_to_the_end(base: Path, tmp_path: Path) -> None:
    """SIGTERM's path (the flow trainer's Session): checkpoint, status stopped; the same command
    again resumes and finishes."""
    from trainers.train import Session

    cfg = parse_finetune_config(ft_cfg(base, "sft"))
    run = RunDir(tmp_path / "run")
    run.create()

    def stopping(c: Any, r: RunDir, d: Dist) -> FinetuneTrainer:
        trainer = FinetuneTrainer(c, r, d)
        real_step = trainer.train_step

        def step() -> tuple[float, float]:
            out = real_step()
            trainer.stop_requested = trainer.step == 2  # as the signal handler would
            return out

        trainer.train_step = step  # type: ignore[method-assign]
        return trainer

    assert Session(cfg, run, Dist(), stopping).run_to_end() == 0
    assert run.read_status()["status"] == "stopped" and run.read_status()["step"] == 2
    assert Session(cfg, run, Dist(), FinetuneTrainer).run_to_end() == 0
    status = run.read_status()
    assert status["status"] == "ok" and status["step"] == 4
    steps = [r["step"] for r in run.read_metrics() if r["name"] == "train/loss"]
    assert steps == [2, 4]  # no duplicated rows after the resume


def test_registry_lists_every_subject_metric() -> None:
    from trainers.registry import FINETUNE_METRICS
    from trainers.subject_eval import METRIC_NAMES

    assert set(METRIC_NAMES) <= FINETUNE_METRICS
