"""The fine-tuning methods: ``method`` -> what is trained on, with which loss.

- ``ct`` (continued training) and ``sft`` (supervised fine-tuning) share the flow-matching loss
  of pre-training; they differ in the data: ``ct`` continues on a data set (all of it unless
  ``subset`` narrows it; typically new data under ``data:``, a domain shift), ``sft`` needs a
  curated subset (``subset.where`` / ``captions_containing`` / ``size``).
- ``dreambooth`` (Ruiz et al. 2023): instance images of a new subject captioned with an
  identifier token, plus prior preservation: class images the starting model generated for
  ordinary captions, trained on with weight lambda (:func:`dreambooth_loss`).

Every method trains what :mod:`trainers.finetune.lora` leaves trainable (LoRA adapters) or every
backbone weight (``lora.rank: 0``); the text encoder stays frozen.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from trainers.config import ConfigError, FlowConfig
from trainers.errors import DataError
from trainers.files import atomic_write_bytes
from trainers.finetune.config import FinetuneConfig
from trainers.flow import FlowGenerators, flow_matching_loss
from trainers.train import TrainData, load_data, purpose_generator, step_generators

if TYPE_CHECKING:
    from trainers.finetune.train import FinetuneTrainer

GenerateFn = Callable[[Sequence[str], Sequence[int]], Tensor]

__all__ = ["METHODS", "DreamboothLoss", "FinetuneMethod", "dreambooth_loss", "select_subset"]


class FinetuneMethod:
    """A method's hooks into :class:`trainers.finetune.train.FinetuneTrainer`.

    - :meth:`training_data` (at ``__init__``, before the model is loaded): the images and
      captions trained on.
    - :meth:`prepare` (main rank, after the model is built, before a resume loads weights): one-
      off work with the starting model, cached in ``<run_dir>/finetune/``.
    - :meth:`train_step`: one optimizer step (through ``trainer.optimizer_step``), every draw
      from the step's generators (resume = uninterrupted); default: the flow trainer's step.
    - :meth:`evaluate` (main rank): metrics beyond the flow trainer's, at every evaluation.
    - :meth:`vocabulary`: words the text encoder must know (a trained-vocabulary encoder gets
      an embedding row for each new one).
    """

    name: ClassVar[str]

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg

    def training_data(self, trainer: FinetuneTrainer) -> TrainData:
        data = load_data(trainer.cfg, trainer.device)
        keep = select_subset(self.cfg, trainer.cfg, data.captions)
        if len(keep) < len(data.captions):
            idx = torch.tensor(keep)
            data = TrainData(
                data.x[idx],
                [data.captions[i] for i in keep],
                data.latent,
                data.vocabulary,
                data.vae,
            )
        return data

    def vocabulary(self) -> list[str]:
        return []

    def prepare(self, trainer: FinetuneTrainer) -> None:
        """One-off work before training (default: none)."""

    def train_step(self, trainer: FinetuneTrainer) -> tuple[float, float]:
        return trainer.flow_step()

    def evaluate(self, trainer: FinetuneTrainer, generate: GenerateFn) -> dict[str, float]:
        return {}

    def sample_prompts(self) -> list[str] | None:
        """The sample grid's prompts (null: the data's fixed set)."""
        return None


# ----------------------------------------------------------------------------------------------
# ct / sft: which images


def _words(caption: str) -> set[str]:
    from trainers.text import split_words

    return set(split_words(caption))


def select_subset(cfg: FinetuneConfig, flow: FlowConfig, captions: list[str]) -> list[int]:
    """Indices (in data order) of the training images ``cfg.subset`` keeps. ``where`` reads the
    embedded data's attributes of each image (the data is a function of its seed); it is an
    error on other data. An empty selection is an error naming the filter."""
    s = cfg.subset
    keep = list(range(len(captions)))
    if s.where:
        if flow.data.kind != "shapes":
            raise ConfigError(
                "subset.where selects by the embedded data's attributes; this data is "
                f"{flow.data.kind!r}: use subset.captions_containing instead"
            )
        from trainers.data.shapes import ATTRIBUTES, sample_attrs

        for attr, values in s.where.items():
            if attr not in ATTRIBUTES:
                raise ConfigError(
                    f"subset.where: unknown attribute {attr!r}; allowed: {', '.join(ATTRIBUTES)}"
                )
            bad = [v for v in values if v not in ATTRIBUTES[attr]]
            if bad:
                raise ConfigError(
                    f"subset.where.{attr}: unknown value(s) {bad}; allowed: "
                    f"{', '.join(ATTRIBUTES[attr])}"
                )
        attrs = [sample_attrs(flow.data.seed, "train", i) for i in keep]
        keep = [
            i
            for i, a in zip(keep, attrs, strict=True)
            if all(getattr(a, k) in v for k, v in s.where.items())
        ]
    if s.captions_containing:
        wanted = {w.lower() for w in s.captions_containing}
        keep = [i for i in keep if wanted <= _words(captions[i])]
    if s.size is not None:
        keep = keep[: s.size]
    if not keep:
        raise DataError(
            f"subset {s.model_dump(exclude_defaults=True)} keeps no training image; "
            "widen the filter"
        )
    return keep


# ----------------------------------------------------------------------------------------------
# dreambooth: the loss with prior preservation


@dataclass(frozen=True)
class DreamboothLoss:
    loss: Tensor  # L_instance + lambda * L_prior (with its graph)
    instance: Tensor  # L_instance (detached)
    prior: Tensor  # L_prior (detached; 0 when lambda is 0)


def dreambooth_loss(
    predict: Callable[[Tensor, Tensor, list[str]], Tensor],
    instance: tuple[Tensor, list[str]],
    prior: tuple[Tensor, list[str]] | None,
    flow: FlowConfig,
    shift: float,
    generators: tuple[FlowGenerators, FlowGenerators],
    weight: float,
) -> DreamboothLoss:
    """DreamBooth's prior-preservation loss in flow matching: the flow-matching loss on the
    instance images plus ``weight`` times the flow-matching loss on the class images (the
    diffusers DreamBooth script's ``loss + prior_loss_weight * prior_loss``; each term is the
    mean over its own images, so lambda weighs the two sets whatever their batch sizes).
    ``predict(x_t, t, captions)``; each set draws t and noise from its own generators."""
    x_i, c_i = instance
    inst = flow_matching_loss(
        lambda x, t: predict(x, t, c_i), x_i, flow.timesteps, shift, generators[0]
    ).loss
    if prior is None or weight == 0.0:
        return DreamboothLoss(inst, inst.detach(), torch.zeros(()))
    x_p, c_p = prior
    pri = flow_matching_loss(
        lambda x, t: predict(x, t, c_p), x_p, flow.timesteps, shift, generators[1]
    ).loss
    return DreamboothLoss(inst + weight * pri, inst.detach(), pri.detach())


def method_info(cfg: FinetuneConfig) -> dict[str, Any]:
    """The method's settings recorded in ``final/harness.json`` (``finetune``)."""
    info: dict[str, Any] = {"method": cfg.method, "lora": cfg.lora.model_dump(mode="json")}
    if cfg.method == "dreambooth":
        d = cfg.dreambooth
        info |= {
            "subject": d.subject,
            "token": d.token,
            "instances": d.instances,
            "prior": cfg.prior.model_dump(mode="json"),
        }
    else:
        info["subset"] = cfg.subset.model_dump(mode="json")
    return info


class Ct(FinetuneMethod):
    """Continued training: the flow loss on a data set (``subset`` may narrow it)."""

    name = "ct"


class Sft(FinetuneMethod):
    """Supervised fine-tuning: the flow loss on a curated subset (the config requires one)."""

    name = "sft"


class Dreambooth(FinetuneMethod):
    """DreamBooth with prior preservation (see the module docstring and
    ``trainers/data/subject.py`` for the subject, its instance images and prompts)."""

    name = "dreambooth"

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.prior_x: Tensor | None = None
        self.prior_captions: list[str] = []
        self.evaluator: Any = None

    def training_data(self, trainer: FinetuneTrainer) -> TrainData:
        from trainers.data.subject import instance_set

        d, flow = self.cfg.dreambooth, trainer.cfg
        if flow.data.kind != "shapes":
            raise ConfigError(
                f"dreambooth's subjects ({d.subject!r}) are drawn in the embedded data's style; "
                f"the starting model was trained on {flow.data.kind!r} data"
            )
        inst = instance_set(d.subject, d.instances, flow.data.resolution, d.instance_seed, d.token)
        return _as_train_data(inst.images, list(inst.captions), trainer)

    def vocabulary(self) -> list[str]:
        return [self.cfg.dreambooth.token]

    def prepare(self, trainer: FinetuneTrainer) -> None:
        if self.cfg.prior.weight == 0.0:
            return
        self.prior_x, self.prior_captions = class_images(trainer, self.cfg)

    def train_step(self, trainer: FinetuneTrainer) -> tuple[float, float]:
        cfg, step, rank = trainer.cfg, trainer.step, trainer.dist.rank
        gens = step_generators(cfg.seed, step, rank)
        idx, drop = trainer.draw_batch(step, gens)
        x_i = trainer.data.batch(idx, trainer.device)
        c_i = [
            "" if dropped else trainer.data.captions[i]
            for i, dropped in zip(idx.tolist(), drop.tolist(), strict=True)
        ]
        prior = None
        prior_gens = FlowGenerators(
            timesteps=purpose_generator(cfg.seed, step, rank, "prior_timesteps"),
            noise=purpose_generator(cfg.seed, step, rank, "prior_noise"),
        )
        if self.prior_x is not None:
            pidx = trainer.prior_order.indices(step, rank, trainer.dist.world)
            prior = (
                self.prior_x[pidx].to(trainer.device),
                [self.prior_captions[i] for i in pidx.tolist()],
            )
        with trainer.autocast():
            out = dreambooth_loss(
                trainer.model,
                (x_i, c_i),
                prior,
                cfg,
                trainer.shift,
                (gens.flow(), prior_gens),
                self.cfg.prior.weight,
            )
        trainer.check_finite(out.loss)
        trainer.window("train/instance_loss", float(out.instance))
        trainer.window("train/prior_loss", float(out.prior))
        grad_norm = trainer.optimizer_step(out.loss)
        return float(out.loss.detach()), grad_norm

    def evaluate(self, trainer: FinetuneTrainer, generate: GenerateFn) -> dict[str, float]:
        from trainers.subject_eval import SubjectEvaluator

        d = self.cfg.dreambooth
        if self.evaluator is None:
            self.evaluator = SubjectEvaluator(
                subject=d.subject,
                token=d.token,
                resolution=trainer.cfg.data.resolution,
                device=trainer.device,
                num_prompts=d.eval_prompts,
                seeds=list(d.eval_seeds),
                instance_seed=d.instance_seed,
                instances=d.instances,
            )
        return self.evaluator.run(generate)

    def sample_prompts(self) -> list[str] | None:
        from trainers.data.subject import class_prompts, subject_prompts

        d, n = self.cfg.dreambooth, self.cfg.sample.num_prompts
        half = max(1, n // 2)
        ours = [c for c, _ in subject_prompts(d.subject, half, d.instance_seed, d.token)]
        return ours + [c for c, _ in class_prompts(n - half, seed=1)]


METHODS: dict[str, type[FinetuneMethod]] = {m.name: m for m in (Ct, Sft, Dreambooth)}
"""Name -> method; the names are ``trainers.finetune.config.Method``'s values (a test checks)."""


def _as_train_data(images: Tensor, captions: list[str], trainer: FinetuneTrainer) -> TrainData:
    """uint8 images [N, 3, H, W] as training data in the starting model's space (latents when
    it was trained on a VAE's)."""
    from trainers.data.shapes import caption_vocabulary

    vocabulary = caption_vocabulary()
    flow = trainer.cfg
    if not flow.data.vae:
        return TrainData(images, captions, False, vocabulary)
    from trainers.data.latents import VaeCodec, encode_images, load_vae

    codec = VaeCodec(load_vae(flow.data.vae, flow.data.vae_subfolder).to(trainer.device))
    return TrainData(encode_images(codec, images).cpu(), captions, True, vocabulary, codec)


@torch.no_grad()
def class_images(trainer: FinetuneTrainer, cfg: FinetuneConfig) -> tuple[Tensor, list[str]]:
    """Prior preservation's class images: the starting model's samples (in its data space, not
    decoded) of ``prior.images`` ordinary captions, Euler with ``prior.steps`` and guidance
    ``prior.guidance``, seeds 0.. (per-item noise). Made once per run with the weights the run
    starts from (also on resume), cached in ``<run_dir>/finetune/class_images.pt`` under a key
    of what made them."""
    from trainers.data.subject import class_prompts
    from trainers.sampling import initial_noise, sample

    p = cfg.prior
    key = {
        "init": str(trainer.init.export.resolve()),
        "images": p.images,
        "steps": p.steps,
        "guidance": p.guidance,
        "seed": cfg.seed,
    }
    cache = trainer.run.root / "finetune" / "class_images.pt"
    if cache.is_file():
        data = torch.load(cache, map_location="cpu", weights_only=True)
        if data.get("key") == repr(sorted(key.items())):
            return data["x"], list(data["captions"])
    captions = [c for c, _ in class_prompts(p.images, seed=cfg.seed)]
    net = trainer.net
    uncond = net.encode([""])
    out = []
    shape = trainer.data.sample_shape
    net.denoiser.eval()
    for a in range(0, len(captions), 64):
        rows = captions[a : a + 64]
        noise = initial_noise(range(a, a + len(rows)), shape).to(trainer.device)
        out.append(
            sample(
                net.denoiser,
                noise,
                net.encode(rows),
                uncond,
                steps=p.steps,
                shift=trainer.shift,
                guidance=p.guidance,
            ).cpu()
        )
    net.denoiser.train()
    x = torch.cat(out)
    if not trainer.data.latent:
        x = x.clamp(-1.0, 1.0)
    buf = io.BytesIO()
    torch.save({"key": repr(sorted(key.items())), "x": x, "captions": captions}, buf)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, buf.getvalue())
    return x, captions
