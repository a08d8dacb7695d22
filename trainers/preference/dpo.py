"""Diffusion-DPO's loss in flow-matching form.

Diffusion-DPO (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference
Optimization") trains on pairs of images of one prompt, a winner ``x0_w`` and a loser ``x0_l``:
the model's denoising error should drop on the winner and rise on the loser *relative to a
frozen reference model* (the starting model), which keeps it near the reference (the KL
regulariser of DPO). The flow-matching form (as in the SD3 / Flux Diffusion-DPO ports) replaces
the noise-prediction error by the velocity error of the harness's conventions
(:mod:`trainers.flow`: ``x_t = (1 - t) x0 + t eps``, the network predicts ``v = eps - x0``)::

    err(net, x0)  = mean over C, H, W of (net(x_t, t) - (eps - x0))^2
    diff          = (err_θ(w) - err_θ(l)) - (err_ref(w) - err_ref(l))
    inside_term   = -beta / 2 * diff
    loss          = -log sigmoid(inside_term)                       (mean over pairs)

The winner and the loser of a pair are noised with the same ``eps`` and the same ``t``, so their
errors differ only through the images (as in the original, which repeats the noise and the
timesteps of the first half of the batch).

**beta.** This is the original code's ``beta_dpo`` (SalesforceAIResearch/DiffusionDPO,
``train.py``: ``inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)``, with per-item
*means* of the squared error). The paper's objective (eq. 14) has the factor
``-beta T omega(lambda_t)`` in front of squared L2 norms (sums over C, H, W); the code puts
``-beta_dpo / 2`` in front of per-element means, folding T and a constant omega into one
number. So ``beta`` here is the paper's ``beta T``, up to that factor 1/2 and the 1 / (C H W)
of the mean (the original launchers train SD 1.5 and SDXL with ``beta_dpo`` = 5000). Because
errors are means over C, H, W, beta does not change meaning with the resolution, but its useful
range does depend on how large the velocity errors are (pixel or latent space, the data's
scale): tune it per setting.

**Implicit accuracy** is the share of pairs with ``inside_term > 0`` (the model already ranks
the winner above the loser more than the reference does); at the start (model = reference)
every inside term is 0 and the accuracy is 0, the loss log 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DpoLoss", "dpo_loss", "dpo_step_loss", "flow_errors"]

Predict = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class DpoLoss:
    """One Diffusion-DPO loss evaluation: the loss to back-propagate and what to log."""

    loss: Tensor  # scalar, differentiable through err_w / err_l (the trained model's errors)
    implicit_acc: float  # share of pairs with inside_term > 0
    reward_margin: float  # mean inside_term = mean of -beta / 2 * (model_diff - ref_diff)
    model_diff: float  # mean of err_θ(w) - err_θ(l)
    ref_diff: float  # mean of err_ref(w) - err_ref(l)


def flow_errors(predict: Predict, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """Per-item velocity error, [B]: the mean over all but the batch dimension of
    ``(predict(x_t, t) - (eps - x0))^2`` with ``x_t = (1 - t) x0 + t eps``.

    predict: ``(x_t [B, C, H, W], t [B]) -> v``, the network with its conditioning bound.
    x0, eps: [B, C, H, W]; t: [B] in [0, 1]. Computed in float32 whatever the model's dtype.
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and eps {tuple(eps.shape)} differ in shape")
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must be [B] = [{x0.shape[0]}], got {tuple(t.shape)}")
    tb = t.to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
    x_t = (1.0 - tb) * x0 + tb * eps
    pred = predict(x_t, t)
    sq = (pred.float() - (eps - x0).float()) ** 2
    return sq.flatten(1).mean(dim=1)


def dpo_loss(
    err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float
) -> DpoLoss:
    """Diffusion-DPO's loss from per-pair errors (all [B]): the trained model's on the winners
    and losers (with grad) and the reference's (treated as constants, detached here).

    ``loss = mean(-log sigmoid(-beta / 2 * ((err_w - err_l) - (ref_err_w - ref_err_l))))``;
    see the module docstring for beta.
    """
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    shapes = {tuple(x.shape) for x in (err_w, err_l, ref_err_w, ref_err_l)}
    if len(shapes) != 1 or err_w.dim() != 1:
        raise ValueError(
            "err_w, err_l, ref_err_w and ref_err_l must all be [B], got "
            f"{[tuple(x.shape) for x in (err_w, err_l, ref_err_w, ref_err_l)]}"
        )
    model_diff = err_w - err_l
    ref_diff = (ref_err_w - ref_err_l).detach()
    inside = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(inside).mean()
    inside_d = inside.detach()
    return DpoLoss(
        loss=loss,
        implicit_acc=float((inside_d > 0).float().mean()),
        reward_margin=float(inside_d.mean()),
        model_diff=float(model_diff.detach().mean()),
        ref_diff=float(ref_diff.mean()),
    )


def dpo_step_loss(
    predict: Predict,
    ref_predict: Predict,
    x0_w: Tensor,
    x0_l: Tensor,
    eps: Tensor,
    t: Tensor,
    beta: float,
) -> DpoLoss:
    """Diffusion-DPO's loss for a batch of B pairs in one forward pass of each model.

    Winners and losers are stacked into one batch of 2B (winners first), each pair noised with
    the same ``eps`` [B, C, H, W] and ``t`` [B]; ``predict`` (the trained model) runs once with
    grad and ``ref_predict`` (the frozen reference) once under ``torch.no_grad()``, both as
    ``(x_t [2B, ...], t [2B]) -> v``; the errors are split back and go to :func:`dpo_loss`.
    """
    if x0_w.shape != x0_l.shape or x0_w.shape != eps.shape:
        raise ValueError(
            f"x0_w {tuple(x0_w.shape)}, x0_l {tuple(x0_l.shape)} and eps {tuple(eps.shape)} "
            "must have the same shape"
        )
    x0 = torch.cat([x0_w, x0_l])
    eps2 = torch.cat([eps, eps])
    t2 = torch.cat([t, t])
    err_w, err_l = flow_errors(predict, x0, eps2, t2).chunk(2)
    with torch.no_grad():
        ref_w, ref_l = flow_errors(ref_predict, x0, eps2, t2).chunk(2)
    return dpo_loss(err_w, err_l, ref_w, ref_l, beta)
