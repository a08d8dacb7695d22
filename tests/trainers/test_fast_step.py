"""The training step's speed settings (fused AdamW, foreach EMA, channels-last convolution
weights) change the results by float rounding only: a trainer with them and one with the plain
settings, from the same seed, follow the same loss curve and end with the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.trainers.trainer_utils import config
from trainers.config import parse_config
from trainers.rundir import RunDir
from trainers.train import CHANNELS_LAST_BACKBONES, Dist, FlowTrainer

STEPS = 6


def _trainer(tmp: Path, backbone: str) -> FlowTrainer:
    cfg = config(model={"backbone": backbone, "preset": "micro"}, train={"batch_size": 8})
    run = RunDir(tmp)
    run.create()
    return FlowTrainer(parse_config(cfg), run, Dist())


def _plain(trainer: FlowTrainer) -> FlowTrainer:
    """The same trainer with the reference settings: per-tensor AdamW, EMA loop, contiguous."""
    cfg = trainer.cfg.train
    trainer.net.denoiser.to(memory_format=torch.contiguous_format)
    trainer.opt = torch.optim.AdamW(
        trainer.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, foreach=False
    )
    warmup = trainer.sched.lr_lambdas[0]
    trainer.sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, warmup)
    trainer.ema.foreach = False
    return trainer


def test_the_fast_step_follows_the_plain_step_to_float_tolerance(tmp_path: Path) -> None:
    fast = _trainer(tmp_path / "fast", "unet")
    plain = _plain(_trainer(tmp_path / "plain", "unet"))
    assert "unet" in CHANNELS_LAST_BACKBONES
    conv = next(m for m in fast.net.denoiser.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.opt.defaults["fused"] and fast.ema.foreach
    fast_losses = [fast.train_step()[0] for _ in range(STEPS)]
    plain_losses = [plain.train_step()[0] for _ in range(STEPS)]
    torch.testing.assert_close(fast_losses, plain_losses, rtol=1e-4, atol=1e-6)
    for a, b in zip(fast.net.parameters(), plain.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    for a, b in zip(fast.ema.shadow_params, plain.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    # The curves did move: the comparison is not between two untrained models.
    assert fast_losses[-1] != fast_losses[0]
