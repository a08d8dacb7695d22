"""The preference-tuning trainer (``python -m trainers.preference``) on a tiny finished flow run:
the method registry, configuration errors, resume equals uninterrupted (GRPO's reused rollout
and DPO's cached arena pairs included), and each method end to end: train, evaluate the rewards
before and after on training and held-out prompts, export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from tests.trainers.trainer_utils import REPO, config, env, run_trainer
from trainers.config import ConfigError
from trainers.export import load_export, state_dict_hash
from trainers.preference.config import Method, parse_preference_config
from trainers.preference.methods import METHODS
from trainers.preference.train import PreferenceTrainer, preference_prompts
from trainers.rundir import RunDir
from trainers.train import Dist, Session


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny flow run: the model every test tunes."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    cfg = config(train={"steps": 10}, eval={"every": 1000, "num_images": 4, "steps": 2})
    proc = run_trainer(cfg, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def pref_cfg(base: Path, method: str = "grpo", **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "seed": 3,
        "init": str(base),
        "method": method,
        "prompts": {"train": 6, "heldout": 3, "seeds": [0]},
        "lora": {"rank": 4, "alpha": 8},
        "refl": {"steps": 3, "stop_min": 1, "prompts_per_step": 2},
        "grpo": {"group_size": 2, "prompts_per_step": 2, "denoise_steps": 3},
        "dpo": {"pairs": "online", "group_size": 2, "prompts_per_step": 2, "beta": 50.0},
        "train": {
            "steps": 4,
            "batch_size": 2,
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


def make(base: Path, run_dir: Path, method: str = "grpo", **kw: Any) -> PreferenceTrainer:
    run = RunDir(run_dir)
    run.create()
    return PreferenceTrainer(parse_preference_config(pref_cfg(base, method, **kw)), run, Dist())


def weights(module: torch.nn.Module) -> str:
    return state_dict_hash(module.state_dict())


def test_method_registry_names_the_config_values() -> None:
    from trainers.preference.config import NON_DIFFERENTIABLE, REWARD_NAMES
    from trainers.preference.rewards import reward_class

    assert set(METHODS) == set(get_args(Method))
    assert {n for n in REWARD_NAMES if not reward_class(n).differentiable} == NON_DIFFERENTIABLE


def test_configuration_errors_name_the_fix(base: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dpo\.pairs_file"):
        parse_preference_config(pref_cfg(base, "dpo", dpo={"pairs": "arena"}))
    with pytest.raises(ConfigError, match="second_reward must differ"):
        parse_preference_config(pref_cfg(base, second_reward={"name": "attribute"}))
    with pytest.raises(ConfigError, match="not differentiable"):
        parse_preference_config(pref_cfg(base, "refl", reward={"name": "judge"}))


def test_prompts_are_distinct_and_held_out_compositions_are_never_trained(base: Path) -> None:
    from trainers.data.shapes import HELDOUT_PAIRS
    from trainers.preference.config import PromptSettings

    cfg = parse_preference_config(pref_cfg(base))
    train, heldout = preference_prompts(
        PromptSettings(train=40, heldout=20), cfg.data or _data(base)
    )
    assert len(set(train)) == 40 and len(set(heldout)) == 20
    assert not any(f"{c} {s}" in p for p in train for s, c in HELDOUT_PAIRS)
    assert all(any(f"{c} {s}" in p for s, c in HELDOUT_PAIRS) for p in heldout)


def _data(base: Path) -> Any:
    from trainers.config import load_config

    return load_config(base / "config.json").data


def test_refl_reward_on_a_hand_worked_case() -> None:
    """Velocity v = c x (a one-parameter model). Euler steps without gradient from t = 1 to the
    stop step, then x0 = x - t v = x (1 - t c) with gradient: for the reward mean(x0) the
    gradient in c is -t mean(x) at the stop step, and nothing flows through the earlier steps."""
    from trainers.preference.methods import refl_reward

    c = torch.tensor(0.5, requires_grad=True)
    noise = torch.tensor([[2.0], [4.0]])
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    x_stop = noise.clone()
    for dt in (-0.25, -0.25):  # stop = 2: two Euler steps without gradient, 1 -> 0.5
        x_stop = x_stop + dt * 0.5 * x_stop
    reward = refl_reward(lambda x, t: c * x, noise, ts, 2, lambda x0: x0.mean(1))
    torch.testing.assert_close(reward, (x_stop * (1 - 0.5 * 0.5)).mean(1))
    reward.mean().backward()
    assert c.grad is not None
    torch.testing.assert_close(c.grad, -0.5 * x_stop.mean())


@pytest.mark.parametrize("method", ["refl", "grpo", "dpo"])
def test_resume_equals_uninterrupted(base: Path, tmp_path: Path, method: str) -> None:
    """GRPO with a rollout reused over two updates (the checkpoint falls between them)."""
    kw: dict[str, Any] = {"grpo": {"updates_per_rollout": 2}} if method == "grpo" else {}
    full = make(base, tmp_path / "full", method, **kw)
    for _ in range(3):
        full.train_step()
    part = make(base, tmp_path / "part", method, **kw)
    part.train_step()
    part.save_checkpoint()
    del part
    resumed = make(base, tmp_path / "part", method, **kw)
    assert resumed.try_resume() and resumed.step == 1
    for _ in range(2):
        resumed.train_step()
    assert weights(resumed.net.denoiser) == weights(full.net.denoiser)
    assert weights(resumed.ema_model()) == weights(full.ema_model())


def test_grpo_trains_only_lora_and_keeps_the_reference_frozen(base: Path, tmp_path: Path) -> None:
    trainer = make(base, tmp_path / "g")
    ref_before = weights(trainer.reference)
    base_before = {
        n: p.detach().clone() for n, p in trainer.net.denoiser.named_parameters() if "lora" not in n
    }
    trainer.train_step()
    assert all("lora" in n for n in trainer.trainable_names)
    assert weights(trainer.reference) == ref_before
    after = dict(trainer.net.denoiser.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in base_before.items())
    # On-policy: the first update of a rollout has ratio exactly 1 and clips nothing.
    logged = trainer.extra_metrics()
    assert logged["train/ratio_mean"] == 1.0 and logged["train/clip_frac"] == 0.0


@pytest.mark.parametrize("method", ["refl", "grpo", "dpo"])
def test_each_method_end_to_end(base: Path, tmp_path: Path, method: str) -> None:
    """Session (what the process runs): evaluates the rewards before and after on training and
    held-out prompts with the second reward beside the trained one, exports the merged model
    and the adapter, records how it was tuned."""
    cfg = parse_preference_config(pref_cfg(base, method))
    run = RunDir(tmp_path / method)
    run.create()
    assert Session(cfg, run, Dist(), PreferenceTrainer).run_to_end() == 0
    assert run.read_status()["status"] == "ok"
    records = run.read_metrics()
    by_name: dict[str, set[int]] = {}
    for r in records:
        by_name.setdefault(r["name"], set()).add(r["step"])
    for name in (
        "reward/attribute/train",
        "reward/attribute/heldout",
        "reward/realism/train",
        "reward/realism/heldout",
        "domain_fid",
    ):
        assert by_name[name] == {0, 4}, name
    assert 4 in by_name["prior_drift/domain_fid"]
    assert "train/reward" in by_name
    meta = json.loads((run.final / "harness.json").read_text())
    assert meta["preference"]["method"] == method
    assert meta["preference"]["reward"]["name"] == "attribute"
    assert (run.final / "lora" / "adapter_model.safetensors").is_file()
    load_export(run.final)  # opens like any export


def test_the_process_entry_point(base: Path, tmp_path: Path) -> None:
    """``python -m trainers.preference`` runs and writes a finished run directory; a bad config
    is a clear error with exit code 2 and no traceback."""
    run_dir = tmp_path / "proc"
    cfg_path = tmp_path / "proc.json"
    cfg_path.write_text(json.dumps(pref_cfg(base, "grpo", train={"steps": 2})))
    cmd = [sys.executable, "-m", "trainers.preference", "--config", str(cfg_path)]
    proc = subprocess.run(
        [*cmd, "--run-dir", str(run_dir)], env=env(), cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert RunDir(run_dir).read_status()["status"] == "ok"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(pref_cfg(base, "grpo", grpo={"noise_level": -1})))
    proc = subprocess.run(
        [*cmd[:-1], str(bad), "--run-dir", str(tmp_path / "bad")],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "grpo.noise_level" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_registry_lists_every_reward_metric() -> None:
    from trainers.preference.config import REWARD_NAMES
    from trainers.registry import PREFERENCE_METRICS

    assert {f"reward/{n}/heldout" for n in REWARD_NAMES} <= PREFERENCE_METRICS
