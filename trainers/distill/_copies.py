"""Frozen copies of the student (progressive's round teacher, consistency's EMA target).

Private to the distillation methods. A copy is made of the bare network (without a
``DistributedDataParallel`` or ``torch.compile`` wrapper), so its ``state_dict`` keys are the
model's own and it can be refreshed from the student whatever wraps the student.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def bare(module: nn.Module) -> nn.Module:
    """``module`` without DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the bare ``module``: no gradients, eval mode."""
    twin = copy.deepcopy(bare(module))
    twin.zero_grad(set_to_none=True)
    twin.requires_grad_(False)
    return twin.eval()


@torch.no_grad()
def copy_into(target: nn.Module, source: nn.Module) -> None:
    """``target <- source`` (parameters and buffers)."""
    target.load_state_dict(bare(source).state_dict())


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``theta^- <- mu theta^- + (1 - mu) theta`` on parameters; buffers are copied."""
    src = bare(source)
    for p_t, p_s in zip(target.parameters(), src.parameters(), strict=True):
        p_t.lerp_(p_s.detach().to(p_t.dtype), 1.0 - decay)
    for b_t, b_s in zip(target.buffers(), src.buffers(), strict=True):
        b_t.copy_(b_s)
