"""The trained model, exported in the diffusers format, and loaded back for sampling.

```
final/
  transformer/     the backbone (EMA weights), ``save_pretrained``
  text_encoder/    the vocab encoder (``save_pretrained``) or a record of the frozen one used
  scheduler/       ``FlowMatchEulerDiscreteScheduler(shift=<training shift>)``, ``save_pretrained``
  harness.json     backbone name, data space (pixels or VAE), shift, timestep sampler, config hash
```

The scheduler records the shift so a diffusers user sees it too; our own sampler reads the shift
from ``harness.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from trainers.errors import WeightsError
from trainers.models import Denoiser
from trainers.sampling import generate_images, generate_student
from trainers.text import load_text_encoder, save_text_encoder

EXPORT_FORMAT = 1


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
    directory.mkdir(parents=True, exist_ok=True)
    denoiser.save_pretrained(directory / "transformer")
    save_text_encoder(text_encoder, directory / "text_encoder")
    FlowMatchEulerDiscreteScheduler(shift=shift).save_pretrained(directory / "scheduler")
    meta = {"format": EXPORT_FORMAT, "backbone": denoiser.backbone, "shift": shift, **info}
    (directory / "harness.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


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
        steps: int = 25,
        solver: str = "euler",
        guidance: float = 3.0,
        shift: float | None = None,
    ) -> torch.Tensor:
        """Images in [-1, 1], [N, 3, H, W]; one per (prompt, seed) pair, zipped.

        A distilled student (``harness.json`` has ``distill``) samples with its own method's
        sampler and no guidance (it was distilled into it): ``solver`` and ``guidance`` must then
        be left at their defaults or match (euler / the student's sampler, 1.0)."""
        distilled = self.meta.get("distill")
        if distilled:
            return generate_student(
                self.denoiser,
                self.text_encoder,
                prompts,
                seeds,
                self.latent_shape,
                sampler=distilled["sampler"],
                steps=steps,
                shift=self.shift if shift is None else shift,
                vae=self.vae,
            )
        return generate_images(
            self.denoiser,
            self.text_encoder,
            prompts,
            seeds,
            self.latent_shape,
            steps=steps,
            solver=solver,
            guidance=guidance,
            shift=self.shift if shift is None else shift,
            vae=self.vae,
        )


def load_export(directory: str | Path, device: torch.device | str = "cpu") -> ExportedModel:
    """Load ``final/`` written by :func:`save_export`."""
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

        vae = VaeCodec(load_vae(meta["vae"], meta.get("vae_subfolder")))
    model = ExportedModel(denoiser.eval(), text_encoder.eval(), meta, vae)
    return model.to(device)
