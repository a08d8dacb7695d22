"""The trained model, exported in the diffusers format, and loaded back for sampling.

```
final/
  model_index.json      the diffusers pipeline: its class and components, and its settings
                        (text encoder kind, sample shape, a student's sampler and steps)
  harness_pipeline.py   HarnessFlowPipeline, a copy of trainers/pipeline_export.py
                        (self-contained: torch, diffusers, transformers only)
  transformer/          the backbone (EMA weights), ``save_pretrained``
  text_encoder/         vocab: the encoder (``save_pretrained``) and vocab_text_encoder.py
                        (the same file again: diffusers loads a custom component's class from
                        its folder); frozen (minilm / clip / t5): the transformers model's
                        own files (config.json and weights, hard-linked where the file system
                        allows) and text_encoder.json, the record of the original
  tokenizer/            frozen encoders only: the tokenizer, ``save_pretrained``
  scheduler/            ``FlowMatchEulerDiscreteScheduler(shift=<training shift>)``
  vae/                  latent-space models only: the ``AutoencoderKL``, ``save_pretrained``
  harness.json          backbone name, data space (pixels or VAE), shift, timestep sampler,
                        config hash, ``distill`` (a student's method, sampler and steps)
```

With diffusers alone (no project code)::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/<run>/final", trust_remote_code=True)
    images = pipe(["a red circle"], seeds=[0], output_type="pt").images  # [N, 3, H, W], [0, 1]

gives the images of ``load_export(path).generate(prompts, seeds, steps=..., solver=...,
guidance=...)`` with the same settings, mapped from [-1, 1] to [0, 1] (``num_inference_steps``
defaults to 25, or to a distilled student's own step count; ``guidance_scale`` to 3.0, and a
student takes none). ``trust_remote_code=True`` is diffusers' requirement for a local directory
that ships code.

The scheduler records the shift so a diffusers user sees it too: the shipped pipeline reads it
from there, our own sampler from ``harness.json``. Exports written before ``model_index.json``
existed (no pipeline, frozen encoders only referenced) still load with :func:`load_export`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainers import pipeline_export
from trainers.errors import WeightsError
from trainers.models import Denoiser
from trainers.sampling import generate_images, generate_student
from trainers.text import (
    FrozenTextEncoder,
    VocabTextEncoder,
    load_text_encoder,
    save_text_encoder,
)

# 2: with the diffusers pipeline (model_index.json, copies of frozen encoders and the VAE);
# 1: the harness's files only. load_export reads both.
EXPORT_FORMAT = 2
PIPELINE_FILE = "harness_pipeline.py"
PIPELINE_CLASS = "HarnessFlowPipeline"
VOCAB_ENCODER_FILE = "vocab_text_encoder.py"


def state_dict_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over keys and float32 bytes in key order: equal hashes mean equal weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_export(
    directory: Path,
    denoiser: Denoiser,
    text_encoder: torch.nn.Module,
    *,
    shift: float,
    info: dict[str, Any],
) -> None:
    """Write the ``final/`` directory (see the module docstring): the harness's files, loaded by
    :func:`load_export`, and a diffusers pipeline over the same files (``model_index.json`` and
    the shipped pipeline), loaded by ``DiffusionPipeline.from_pretrained``.

    ``info`` goes into ``harness.json``; its ``latent_shape`` (the sampled shape), ``vae`` /
    ``vae_subfolder`` (the VAE, copied into ``vae/``) and ``distill`` (``sampler``, ``steps``)
    also configure the pipeline.
    """
    directory.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(directory / "transformer")
    save_text_encoder(
        text_encoder,
        directory / "text_encoder",
        copy_weights=True,
        tokenizer_directory=directory / "tokenizer",
    )
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(directory / "scheduler")
    if info.get("vae"):
        from trainers.data.latents import load_vae

        load_vae(info["vae"], info.get("vae_subfolder")).save_pretrained(directory / "vae")
    meta = {"format": EXPORT_FORMAT, "backbone": denoiser.backbone, "shift": shift, **info}
    write_pipeline(directory, denoiser, text_encoder, meta)
    (directory / "harness.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def write_pipeline(
    directory: Path, denoiser: Denoiser, text_encoder: torch.nn.Module, meta: dict[str, Any]
) -> None:
    """``model_index.json`` and the shipped pipeline file for an export's components.

    Written by hand rather than with ``DiffusionPipeline.save_pretrained``: the components are
    saved by the harness already, and a pipeline object built here would record this project's
    module (``trainers.pipeline_export``) as the source of its classes, which a diffusers user
    does not have; the index must name the shipped files instead.
    """
    source = Path(pipeline_export.__file__).read_text()
    (directory / PIPELINE_FILE).write_text(source)
    if isinstance(text_encoder, VocabTextEncoder):
        (directory / "text_encoder" / VOCAB_ENCODER_FILE).write_text(source)
        text_component = [Path(VOCAB_ENCODER_FILE).stem, pipeline_export.VocabTextEncoder.__name__]
        tokenizer_component: list[str | None] = [None, None]
        kind, max_length = "vocab", int(text_encoder.config.max_length)
    elif isinstance(text_encoder, FrozenTextEncoder):
        text_component = ["transformers", type(text_encoder.model).__name__]
        tokenizer_component = ["transformers", type(text_encoder.tokenizer).__name__]
        kind, max_length = text_encoder.kind, int(text_encoder.max_length)
    else:
        raise TypeError(f"cannot export a {type(text_encoder).__name__} text encoder")
    config = denoiser.transformer.config
    shape = meta.get("latent_shape") or [config.in_channels, config.sample_size, config.sample_size]
    channels, height, width = (int(n) for n in shape)
    distill = meta.get("distill") or {}
    index = {
        "_class_name": [Path(PIPELINE_FILE).stem, PIPELINE_CLASS],
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", type(denoiser.transformer).__name__],
        "scheduler": ["diffusers", FlowMatchEulerDiscreteScheduler.__name__],
        "text_encoder": text_component,
        "tokenizer": tokenizer_component,
        "vae": ["diffusers", "AutoencoderKL"] if meta.get("vae") else [None, None],
        "text_encoder_kind": kind,
        "max_length": max_length,
        "sample_channels": channels,
        "sample_height": height,
        "sample_width": width,
        "student_sampler": distill.get("sampler"),
        "student_steps": distill.get("steps"),
    }
    (directory / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


@dataclass
class ExportedModel:
    """A loaded export: generate images for prompts and seeds, like the trainer's sampler."""

    denoiser: Denoiser
    text_encoder: torch.nn.Module
    meta: dict[str, Any]
    vae: Any = None  # trainers.data.latents.VaeCodec when trained in latent space

    @property
    def shift(self) -> float:
        return float(self.meta["shift"])

    def resolve_shift(self, shift: float | str | None) -> float:
        """The numeric sampling shift for ``generate(shift=...)``: None -> the recorded one;
        a number as is; ``auto`` / ``flux`` -> that rule of ``timesteps.shift`` at the export's
        resolution and token count, with its recorded timesteps config (base resolution,
        ``flux_*`` line)."""
        if shift is None:
            return self.shift
        if isinstance(shift, str):
            from trainers.config import TimestepConfig
            from trainers.timesteps import image_seq_len, resolve_shift_value

            if "timesteps" not in self.meta or "resolution" not in self.meta:
                raise ValueError(
                    f"shift={shift!r} needs the export's timesteps config and resolution in "
                    "harness.json (exports written before they were recorded lack them); "
                    "pass a number"
                )
            _, h, w = self.latent_shape
            patch = getattr(self.denoiser.transformer.config, "patch_size", None)  # UNet: None
            cfg = TimestepConfig(**self.meta["timesteps"])
            return resolve_shift_value(
                cfg, shift, int(self.meta["resolution"]), image_seq_len(h, w, patch)
            )
        return float(shift)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> ExportedModel:
        self.denoiser.to(device)
        self.text_encoder.to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        solver: str | None = None,
        guidance: float | None = None,
        shift: float | str | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W]; one per (prompt, seed) pair, zipped.

        A flow model: ``steps`` (default 25) of ``solver`` (``euler`` default, ``heun``) with
        classifier-free ``guidance`` (default 3.0). A distilled student (``harness.json`` has
        ``distill``) samples with its own method's sampler and no guidance (the teacher's was
        distilled into it); ``steps`` defaults to the steps it was distilled to. Asking a
        student for a guidance other than 1.0 or a solver other than its own sampler raises
        ValueError instead of silently ignoring it. ``shift``: None uses the recorded training
        shift, a number overrides it, ``auto`` / ``flux`` resolve that rule at the export's
        resolution (:meth:`resolve_shift`)."""
        shift = self.resolve_shift(shift)
        distilled = self.meta.get("distill")
        if distilled:
            check_student_arguments(distilled, solver, guidance)
            return generate_student(
                self.denoiser,
                self.text_encoder,
                prompts,
                seeds,
                self.latent_shape,
                sampler=distilled["sampler"],
                steps=int(steps or distilled.get("steps") or 1),
                shift=shift,
                vae=self.vae,
            )
        return generate_images(
            self.denoiser,
            self.text_encoder,
            prompts,
            seeds,
            self.latent_shape,
            steps=25 if steps is None else steps,
            solver=solver or "euler",
            guidance=3.0 if guidance is None else guidance,
            shift=shift,
            vae=self.vae,
        )


def check_student_arguments(
    distilled: dict[str, Any], solver: str | None, guidance: float | None
) -> None:
    """Refuse sampling arguments a distilled student cannot honour (``distilled``: the
    ``distill`` record of its ``harness.json``): it samples with its own sampler and without
    classifier-free guidance, so another solver or a guidance other than 1.0 (none) would be
    silently ignored."""
    what = (
        f"this model is distilled ({distilled.get('method')}, {distilled.get('steps')} steps, "
        f"teacher guidance {distilled.get('guidance')} distilled in)"
    )
    if guidance is not None and float(guidance) != 1.0:
        raise ValueError(
            f"guidance={guidance}: {what}; it samples without classifier-free guidance, so "
            "leave guidance unset (or 1.0)"
        )
    own = distilled.get("sampler")
    if solver is not None and solver not in (own, *(("euler",) if own == "ode" else ())):
        raise ValueError(
            f"solver={solver!r}: {what}; it samples with its own {own!r} sampler"
            f"{' (Euler)' if own == 'ode' else ''}, so leave solver unset"
        )


def load_export(directory: str | Path, device: torch.device | str = "cpu") -> ExportedModel:
    """Load ``final/`` written by :func:`save_export` (or by earlier versions, without
    ``model_index.json``) with this project's classes, on ``device``."""
    directory = Path(directory)
    meta_path = directory / "harness.json"
    if not meta_path.is_file():
        raise WeightsError(
            f"{directory} is not an exported model: {meta_path} is missing; "
            "pass the final/ directory "
            "of a finished run (it is written when a run ends with status ok)"
        )
    meta = json.loads(meta_path.read_text())
    denoiser = Denoiser.from_pretrained(meta["backbone"], directory / "transformer")
    text_encoder = load_text_encoder(directory / "text_encoder")
    vae = None
    if meta.get("vae"):
        from trainers.data.latents import VaeCodec, load_vae

        if (directory / "vae" / "config.json").is_file():  # the export's copy
            vae = VaeCodec(load_vae(str(directory / "vae")))
        else:  # exports written before the VAE was copied: the recorded source
            vae = VaeCodec(load_vae(meta["vae"], meta.get("vae_subfolder")))
    model = ExportedModel(denoiser.eval(), text_encoder.eval(), meta, vae)
    return model.to(device)
