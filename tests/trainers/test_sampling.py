"""trainers/sampling.py: guidance, the registries' lookups and batching (the solvers' numerics
are tested in test_flow.py, the students' samplers on a trained teacher in test_distill.py)."""

import pytest
import torch

from trainers.distill.base import expand
from trainers.sampling import (
    generate_batched,
    guided_velocity,
    sample,
    sample_student,
    solver_nfe,
)
from trainers.text import TextEmbeddings


def _text(b: int, seed: int) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    return TextEmbeddings(
        tokens=torch.randn(b, 2, 3, generator=g),
        pooled=torch.randn(b, 3, generator=g),
        mask=torch.ones(b, 2, dtype=torch.bool),
    )


def _net(x: torch.Tensor, t: torch.Tensor, text: TextEmbeddings) -> torch.Tensor:
    return torch.tanh(x * (1 + t.view(-1, 1, 1, 1)) + text.pooled.sum(-1).view(-1, 1, 1, 1))


def test_guidance_broadcasts_a_one_row_uncond() -> None:
    x, t, cond, uncond = torch.randn(4, 1, 2, 2), torch.rand(4), _text(4, 0), _text(1, 1)
    one_row = guided_velocity(_net, x, t, cond, uncond, 2.5)
    assert torch.equal(one_row, guided_velocity(_net, x, t, cond, expand(uncond, 4), 2.5))
    v_c, v_u = _net(x, t, cond), _net(x, t, expand(uncond, 4))
    torch.testing.assert_close(one_row, v_u + 2.5 * (v_c - v_u))
    # w = 1 or no uncond: the conditional velocity alone.
    assert torch.equal(guided_velocity(_net, x, t, cond, uncond, 1.0), v_c)
    assert torch.equal(guided_velocity(_net, x, t, cond, None, 2.5), v_c)


def test_ode_student_is_the_unguided_euler_solver() -> None:
    noise, text = torch.randn(3, 1, 2, 2), _text(3, 2)
    ode = sample_student(_net, noise, text, sampler="ode", steps=3, shift=2.0, seeds=[0, 1, 2])
    assert torch.equal(ode, sample(_net, noise, text, None, steps=3, shift=2.0, solver="euler"))


def test_unknown_solver_and_sampler_are_clear_errors() -> None:
    noise, text = torch.randn(1, 1, 2, 2), _text(1, 0)
    with pytest.raises(ValueError, match="allowed: euler, heun"):
        sample(_net, noise, text, None, steps=1, shift=1.0, solver="rk4")
    with pytest.raises(ValueError, match="allowed: euler, heun"):
        solver_nfe("rk4", 4)
    with pytest.raises(ValueError, match="allowed: ode, consistency"):
        sample_student(_net, noise, text, sampler="nope", steps=1, shift=1.0, seeds=[0])  # type: ignore[arg-type]


def test_generate_batched_is_independent_of_the_batch_size() -> None:
    net = torch.nn.Conv2d(1, 1, 1)

    def encode(prompts: list[str]) -> TextEmbeddings:
        return _text(len(prompts), 0)

    def sample_batch(noise: torch.Tensor, text: TextEmbeddings, seeds: list[int]) -> torch.Tensor:
        return net(noise) + torch.tensor(seeds, dtype=torch.float32).view(-1, 1, 1, 1)

    prompts, seeds = ["a", "b", "c", "d", "e"], [3, 1, 4, 1, 5]
    whole = generate_batched(net, encode, prompts, seeds, (1, 2, 2), sample_batch, batch_size=8)
    small = generate_batched(net, encode, prompts, seeds, (1, 2, 2), sample_batch, batch_size=2)
    assert torch.equal(whole, small) and whole.shape == (5, 1, 2, 2)
    assert net.training  # restored after sampling in eval mode
    with pytest.raises(ValueError, match="5 prompts but 1 seeds"):
        generate_batched(net, encode, prompts, [0], (1, 2, 2), sample_batch)
