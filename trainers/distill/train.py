"""The distillation trainer process: ``python -m trainers.distill --config C.json --run-dir DIR``.

It is the flow trainer (``trainers/train.py``: the same run directory, resume, signals, EMA,
evaluation, samples and export) with three things replaced:

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
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainers.config import ConfigError, FlowConfig, load_config, parse_config
from trainers.distill.base import Batch, Context, expand
from trainers.distill.config import DistillConfig, load_distill_config
from trainers.distill.methods import build_method
from trainers.errors import WeightsError
from trainers.export import load_export
from trainers.rundir import RunDir
from trainers.sampling import generate_student
from trainers.train import Dist, FlowNet, FlowTrainer, NonFiniteLoss, main, step_generator


@dataclass(frozen=True)
class Teacher:
    """A resolved teacher: its export directory and the flow config it was trained with."""

    export: Path
    config: FlowConfig


def resolve_teacher(cfg: DistillConfig) -> Teacher:
    """``teacher`` is a finished run directory (``final/`` + ``config.json``) or an export
    directory (``harness.json``; its parent's ``config.json`` is used when there is one, else
    ``data`` must be given)."""
    root = Path(cfg.teacher).expanduser()
    if (root / "final" / "harness.json").is_file():
        export, run_root = root / "final", root
    elif (root / "harness.json").is_file():
        export, run_root = root, root.parent
    else:
        raise WeightsError(
            f"teacher {cfg.teacher!r} is neither a finished run directory (with "
            "final/harness.json) nor an exported model (with harness.json); train the teacher "
            "first, e.g. `harness study run studies/timestep.yaml`, and pass its run directory"
        )
    run_config = run_root / "config.json"
    if run_config.is_file():
        flow = load_config(run_config)
    elif cfg.data is not None:
        meta = json.loads((export / "harness.json").read_text())
        flow = parse_config(
            {
                "model": {"backbone": meta["backbone"]},
                "text": {"encoder": meta.get("text_encoder", "vocab")},
                "timesteps": meta.get("timesteps", {}),
                "data": cfg.data.model_dump(),
            }
        )
    else:
        raise ConfigError(
            f"teacher {cfg.teacher!r} has no config.json next to its export, so its training "
            "data is unknown; give `data:` in the distillation config"
        )
    if not isinstance(flow, FlowConfig):
        raise ConfigError(f"teacher {cfg.teacher!r} was not trained by the flow trainer")
    return Teacher(export, flow)


def student_view(cfg: DistillConfig, teacher: Teacher) -> FlowConfig:
    """The flow config the student is trained and evaluated under: the teacher's model, data,
    text and timesteps; this config's seed, train, eval and sample settings, with evaluation
    and samples at the student's step count and no guidance."""
    data = teacher.config.model_dump(mode="json")
    steps = cfg.distill.steps
    data.update(
        seed=cfg.seed,
        train=cfg.train.model_dump(mode="json"),
        eval=cfg.eval.model_dump(mode="json") | {"steps": steps, "guidance": 1.0},
        sample=cfg.sample.model_dump(mode="json") | {"steps": steps, "guidance": 1.0},
    )
    data.pop("repa", None)
    data["text"]["cfg_dropout"] = 0.0  # the student learns the conditional, guided output
    if cfg.data is not None:
        data["data"] = cfg.data.model_dump(mode="json")
    return parse_config(data, "<student view>")


class DistillTrainer(FlowTrainer):
    def __init__(self, cfg: DistillConfig, run: RunDir, dist_: Dist):
        if dist_.world > 1:
            raise ConfigError(
                "distillation runs in one process; launch it without torchrun "
                "(resources.gpus_per_trial: 1)"
            )
        self.dcfg = cfg
        self.teacher_info = resolve_teacher(cfg)
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
        self._window: dict[str, list[float]] = {}

    def build_net(self) -> FlowNet:
        exported = load_export(self.teacher_info.export, self.device)
        text = exported.text_encoder.requires_grad_(False).eval()
        text.trainable = False  # frozen: FlowNet keeps it out of parameters() and checkpoints
        if float(exported.meta["shift"]) != self.shift:
            raise WeightsError(
                f"teacher export {self.teacher_info.export} was trained with shift "
                f"{exported.meta['shift']} but its config gives {self.shift}"
            )
        return FlowNet(exported.denoiser.train().requires_grad_(True), text)

    def config_hash(self) -> str:
        return self.dcfg.hash()

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
            self._window.setdefault(k, []).append(v)
        grad_norm = self.optimizer_step(loss)
        self.method.after_student_step(self.step)
        return value, grad_norm

    def extra_metrics(self) -> dict[str, float]:
        """The method's own metrics, averaged over the steps since the last log line."""
        out = {k: sum(v) / len(v) for k, v in self._window.items() if v}
        self._window.clear()
        return out

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
        return {
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
