"""The distillation trainer process: ``python -m trainers.distill --config C.json --run-dir DIR``.

It is the post-training seam (``trainers/post.py``: the flow trainer's run directory, resume,
signals, EMA, evaluation, samples and export, with a finished model as the start) with three
things replaced:

- the model: the student starts as the teacher's exported weights (``final/``); the text
  encoder is the teacher's, frozen; a second, frozen copy of the teacher gives the targets;
- the step: the configured method's loss (``trainers/distill/<method>.py``) instead of flow
  matching, with the method's own networks updated inside it;
- sampling: evaluation and samples use the student at ``distill.steps`` with its method's
  sampler (``trainers.sampling.sample_student``), without classifier-free guidance (distilled
  into it).

Data, text encoder, model architecture and shift come from the teacher run's ``config.json``.
One process only: the methods call the student directly, outside DDP.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch

from trainers.config import FlowConfig
from trainers.distill.base import Batch, Context, expand
from trainers.distill.config import DistillConfig, load_distill_config
from trainers.distill.methods import build_method
from trainers.post import InitModel, PostTrainer, check_single_process, flow_view, resolve_init
from trainers.rundir import RunDir
from trainers.sampling import generate_student
from trainers.train import Dist, FlowNet, NonFiniteLoss, main, step_generator

Teacher = InitModel
"""A resolved teacher: the post-training seam's starting model (``trainers/post.py``)."""


def resolve_teacher(cfg: DistillConfig) -> Teacher:
    """``teacher`` is a finished run directory or an export (:func:`trainers.post.resolve_init`)."""
    return resolve_init(cfg.teacher, cfg.data, key="teacher")


def student_view(cfg: DistillConfig, teacher: Teacher) -> FlowConfig:
    """The flow config the student is trained and evaluated under: the teacher's model, data,
    text and timesteps; this config's seed, train, eval and sample settings, with evaluation
    and samples at the student's step count and no guidance, and no caption dropout (the
    student learns the conditional, guided output)."""
    steps = cfg.distill.steps
    return flow_view(
        teacher,
        seed=cfg.seed,
        train=cfg.train,
        eval=cfg.eval.model_dump(mode="json") | {"steps": steps, "guidance": 1.0},
        sample=cfg.sample.model_dump(mode="json") | {"steps": steps, "guidance": 1.0},
        data=cfg.data,
        cfg_dropout=0.0,
    )


class DistillTrainer(PostTrainer):
    """The post-training seam with the teacher as the starting model and the student its
    trained copy."""

    def __init__(self, cfg: DistillConfig, run: RunDir, dist_: Dist):
        check_single_process(dist_, "distillation")
        self.pcfg = self.dcfg = cfg
        self.init = self.teacher_info = resolve_teacher(cfg)
        super().__init__(student_view(cfg, self.teacher_info), run, dist_)
        self.teacher = copy.deepcopy(self.net.denoiser).requires_grad_(False).eval()
        self.ctx = Context(
            cfg=cfg,
            student=self.net.denoiser,
            teacher=self.teacher,
            encode=self.net.encode,
            shift=self.shift,
            sample_shape=self.data.sample_shape,
            device=self.device,
            captions=self.data.captions,
        )
        self.method = build_method(self.ctx)
        if dist_.main:
            self.method.prepare(run.root / "distill")

    def state(self) -> dict[str, Any]:
        return super().state() | {"method": self.method.extra_state()}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.method.load_extra_state(ckpt["method"])

    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        gen = step_generator(cfg.seed, self.step, self.dist.rank)
        idx = self.order.indices(self.step, self.dist.rank, self.dist.world)
        captions = [self.data.captions[i] for i in idx.tolist()]
        text = self.net.encode(captions)
        batch = Batch(
            x0=self.data.batch(idx, self.device),
            captions=captions,
            text=text,
            uncond=expand(self.net.encode([""]), len(captions)),
        )
        loss, metrics = self.method.student_loss(batch, gen, self.step)
        value = float(loss.detach())
        if not math.isfinite(value) or not all(math.isfinite(v) for v in metrics.values()):
            raise NonFiniteLoss(f"non-finite loss ({value}, {metrics}) at step {self.step + 1}")
        for k, v in metrics.items():
            self.window(k, v)
        grad_norm = self.optimizer_step(loss)
        self.method.after_student_step(self.step)
        return value, grad_norm

    def _generator_fn(self, net: FlowNet, solver: str, steps: int, guidance: float):
        sampler = self.method.sampler

        @torch.no_grad()
        def gen(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
            return generate_student(
                net.denoiser,
                net.text_encoder,
                prompts,
                seeds,
                self.data.sample_shape,
                sampler=sampler,
                steps=self.dcfg.distill.steps,
                shift=self.sample_shift,
                vae=self.data.vae,
                batch_size=max(self.cfg.train.batch_size, 64),
            )

        return gen

    def grid_loss(self, net: FlowNet) -> dict[str, float]:
        """Evaluation values that need no sampling: ``eval/nfe`` (network evaluations per image,
        the cost axis of a quality-vs-steps study) and ``eval/flow_loss`` when asked for."""
        return {"eval/nfe": float(self.dcfg.distill.steps)} | super().grid_loss(net)

    def sample_meta(self) -> dict[str, Any]:
        return {"solver": self.method.sampler, "method": self.dcfg.distill.method}

    def export_info(self) -> dict[str, Any]:
        d = self.dcfg.distill
        return super().export_info() | {
            "distill": {
                "method": d.method,
                "steps": d.steps,
                "sampler": self.method.sampler,
                "guidance": d.guidance,
                "teacher": str(self.teacher_info.export.resolve()),
            }
        }


def run(argv: Sequence[str] | None = None) -> int:
    return main(
        argv,
        prog="python -m trainers.distill",
        description="Distil a finished flow run (the teacher) into a few-step student and write "
        "the student's run directory.",
        load=load_distill_config,
        make_trainer=DistillTrainer,
    )
