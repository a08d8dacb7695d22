"""The flow-matching trainer process: ``python -m trainers.flow --config C.json --run-dir DIR``.

One process (or one per GPU under ``torchrun``) trains, evaluates and writes the run directory
(``trainers/rundir.py``). Guarantees:

- Resume: every random draw of step ``k`` (batch, caption dropout, t, noise) is a function of
  ``(seed, k, rank)``, so a run restarted from its checkpoint continues exactly as an
  uninterrupted run would. Curriculum stages (``trainers/curriculum.py``) are a function of the
  step too (resolution, shift, caption subsets from a ``(seed, step, rank, "captions")``
  stream), so resuming inside a stage is exact as well.
- Common random numbers: the batch order depends on ``seed`` only, and caption dropout, the
  uniforms behind t and the noise each have their own generator seeded by
  ``(seed, k, rank, purpose)`` (:func:`step_generators`); every timestep sampler is a transform
  of the same uniforms (``trainers/timesteps.py``). Two configurations that differ only in
  training choices (timestep sampler or shift, REPA, ...) and share a seed therefore see the
  same data order, dropout masks, uniforms and noise, and start from the same denoiser weights
  (the global RNG is seeded with ``seed`` before the data, the text encoder and the denoiser are
  built, and nothing that depends on the timesteps or REPA draws from it before; REPA's
  projector is built after), so their difference is paired seed by seed.
- SIGTERM / SIGINT: checkpoint, ``status: stopped``, exit 0.
- A non-finite loss: ``status: failed`` with the step and reason, exit 1.
- Bad config, data or weights: ``status: failed`` with the message, exit 2.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.training_utils import EMAModel
from torch import nn

from trainers.config import ConfigError, FlowConfig, LogConfig, load_config
from trainers.curriculum import (
    Stage,
    downsample,
    partial_captions,
    pixels_seen,
    stage_at,
    stages,
    validate_curriculum,
)
from trainers.errors import DataError, WeightsError
from trainers.export import save_export, state_dict_hash
from trainers.flow import FlowGenerators, FlowLoss, flow_matching_loss, grid_flow_loss
from trainers.logs import Progress, tee_output
from trainers.models import PRESETS, build_denoiser, count_parameters
from trainers.repa import Repa, build_repa
from trainers.rundir import RunDir
from trainers.sampling import generate_images, solver_nfe
from trainers.text import TextEmbeddings, build_text_encoder, split_words
from trainers.timesteps import image_seq_len, resolve_shift_value
from trainers.trackers import close_trackers, open_trackers

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
_CPU = torch.device("cpu")


# Convolutional backbones keep their weights channels-last: oneDNN's CPU convolutions (and
# cuDNN's) are faster in that layout (bench/BENCHMARKS.md, "Training speed").
CHANNELS_LAST_BACKBONES = frozenset({"unet"})


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# process setup


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = _CPU

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str) -> Dist:
    """One process, or DDP under torchrun (WORLD_SIZE > 1): NCCL on CUDA, else gloo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if use_cuda:
        # TF32 for the fp32 matmuls/convs left outside bf16 autocast (Ampere and later).
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return Dist(rank=dist.get_rank(), world=world, device=device)


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """One stream for all the draws of a step: the distillation trainer's (its methods draw in
    their own order). The flow trainer uses :func:`step_generators` instead."""
    # A distinct, reproducible stream per (seed, step, rank); large odd multipliers keep the
    # streams of neighbouring steps and ranks apart.
    return torch.Generator().manual_seed(
        (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63)
    )


def purpose_generator(seed: int, step: int, rank: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, step, rank, purpose)``: independent streams
    for different purposes, steps, ranks and seeds, and the same stream in any configuration."""
    key = f"{seed}/{step}/{rank}/{purpose}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"flowstep").digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


@dataclass(frozen=True)
class StepGenerators:
    """The flow trainer's random streams of one step, one per purpose. Separate streams make
    the draws of one purpose independent of how many numbers another consumes (common random
    numbers: e.g. the noise is the same whatever the timestep sampler)."""

    dropout: torch.Generator  # caption dropout mask
    timesteps: torch.Generator  # the uniforms u behind t
    noise: torch.Generator  # eps

    def flow(self) -> FlowGenerators:
        return FlowGenerators(timesteps=self.timesteps, noise=self.noise)


def denoiser_patch_size(denoiser: nn.Module) -> int | None:
    """The built backbone's patch size (SD3, PixArt); None for the UNet, which has none."""
    return getattr(denoiser.transformer.config, "patch_size", None)


def config_patch_size(cfg: FlowConfig) -> int | None:
    """The patch size ``build_denoiser`` will use (preset, or ``model.overrides.patch_size``);
    None for the UNet. For the shift needed before the denoiser exists (a post-training
    trainer checks its initial export's shift while building it)."""
    if cfg.model.backbone == "unet":
        return None
    preset = PRESETS.get(cfg.model.preset)
    default = preset.patch_size if preset is not None else None
    return int(cfg.model.overrides.get("patch_size", default or 1))


def step_generators(seed: int, step: int, rank: int) -> StepGenerators:
    """The streams of step ``step`` on rank ``rank``: :func:`purpose_generator` per purpose."""
    return StepGenerators(
        dropout=purpose_generator(seed, step, rank, "dropout"),
        timesteps=purpose_generator(seed, step, rank, "timesteps"),
        noise=purpose_generator(seed, step, rank, "noise"),
    )


# ----------------------------------------------------------------------------------------------
# the model being trained


class FlowNet(nn.Module):
    """Backbone plus text encoder. A frozen text encoder is kept out of ``parameters()``,
    ``state_dict()`` and DDP (it is not trained and would bloat every checkpoint)."""

    def __init__(self, denoiser: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.denoiser = denoiser
        if text_encoder.trainable:
            self.text = text_encoder
        else:
            self._frozen_text = [text_encoder]

    @property
    def text_encoder(self) -> nn.Module:
        return self.text if hasattr(self, "text") else self._frozen_text[0]

    def ema_copy(self) -> FlowNet:
        """A frozen copy for the EMA weights; a frozen text encoder is shared, not copied."""
        text = self.text_encoder if not hasattr(self, "text") else copy.deepcopy(self.text)
        return FlowNet(copy.deepcopy(self.denoiser), text).requires_grad_(False).eval()

    def encode(self, captions: Sequence[str]) -> TextEmbeddings:
        return self.text_encoder(list(captions))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        return self.denoiser(x_t, t, self.encode(captions))


# ----------------------------------------------------------------------------------------------
# data


@dataclass
class TrainData:
    x: torch.Tensor  # [N, C, h, w]: uint8 pixels, or float latents
    captions: list[str]
    latent: bool
    vocabulary: list[str]
    vae: Any = None

    def batch(self, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        x = self.x[idx]
        x = x.float() if self.latent else x.float().div(127.5).sub(1.0)
        return x.to(device, non_blocking=True)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]


def load_data(cfg: FlowConfig, device: torch.device) -> TrainData:
    if cfg.data.kind == "shapes":
        from trainers.data.shapes import ShapesDataset, caption_vocabulary

        ds = ShapesDataset(
            seed=cfg.data.seed, split="train", size=cfg.data.size, resolution=cfg.data.resolution
        )
        vocabulary = caption_vocabulary()
    else:
        from trainers.data.folder import ImageFolderDataset

        ds = ImageFolderDataset(cfg.data.path, cfg.data.resolution)
        vocabulary = sorted({w for c in ds.captions for w in split_words(c)})
    if not cfg.data.vae:
        return TrainData(ds.images, list(ds.captions), False, vocabulary)
    from trainers.data.latents import VaeCodec, encode_images, load_vae

    codec = VaeCodec(load_vae(cfg.data.vae, cfg.data.vae_subfolder).to(device))
    return TrainData(
        encode_images(codec, ds.images).cpu(), list(ds.captions), True, vocabulary, codec
    )


class BatchOrder:
    """Epoch-wise shuffling with a per-epoch seed: the indices of step k are a pure function
    of (seed, k), so resuming needs no sampler state. Ranks take disjoint slices."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_033 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int, rank: int, world: int) -> torch.Tensor:
        local = self.global_batch // world
        start = step * self.global_batch + rank * local
        out = [self._perm_of(p // self.n)[p % self.n] for p in range(start, start + local)]
        return torch.stack(out)


# ----------------------------------------------------------------------------------------------
# the trainer


class FlowTrainer:
    """Trains one model and writes its run directory; the post-training trainers
    (``trainers/post.py``: distillation, fine-tuning) subclass it.

    The contract a subclass (or the :class:`Session` that drives it) relies on:

    - Life cycle: ``__init__`` (seed the global RNG, load data, :meth:`build_net`, EMA, REPA,
      optimizer) -> :meth:`try_resume` -> :meth:`fit` -> :meth:`finish`. :class:`Session` drives
      it and writes ``config.json`` (when absent) and ``status.json``; :func:`main` tees
      ``stdout.log`` / ``stderr.log``.
    - :meth:`load_training_data` gives the images and captions (the configured data; a
      fine-tune's method chooses its own); :meth:`build_net` decides what trains: the
      parameters that require gradients when it returns are :meth:`trainable_parameters`, the
      only ones the optimizer, clipping and EMA see (a frozen text encoder and LoRA's base
      weights are not); :meth:`export_denoiser` is what ``final/transformer`` holds.
    - :meth:`build_net` runs right after ``torch.manual_seed(cfg.seed)`` and the data: initial
      weights come from the global RNG there, so anything a training choice adds (REPA's
      projector, a method's networks) must be built after it, or configurations sharing a seed
      stop starting from the same weights.
    - :meth:`fit` loop, per step: stop if any rank got SIGTERM/SIGINT (checkpoint, ``stopped``);
      :meth:`train_step`; every ``train.log_every`` steps (and the last) the ``train/*``
      metrics and :meth:`extra_metrics` to ``metrics.jsonl``; every ``train.checkpoint_every``
      :meth:`save_checkpoint`; every ``eval.every`` :meth:`evaluate` and :meth:`save_samples`,
      else every ``eval.samples_every`` :meth:`save_samples`. After the loop a checkpoint, then
      :meth:`finish`: weight hashes, :meth:`export` (``final/``), :meth:`evaluate`, samples
      ``final``.
    - :meth:`train_step` (every rank) does one optimizer step and returns (loss, grad norm): it
      computes the loss, raises :class:`NonFiniteLoss` on a non-finite one, and calls
      :meth:`optimizer_step` (zero grads, backward, clip, optimizer, schedule, EMA,
      ``self.step += 1``) exactly once. Every random draw of step k comes from generators seeded
      by ``(seed, k, rank)``: the flow step from :func:`step_generators` (one stream per
      purpose: dropout, timesteps, noise, so common random numbers hold across timestep, shift
      and REPA choices), the distillation step from :func:`step_generator` (one stream); batch
      indices from :class:`BatchOrder` (seed only). Not from the global RNG.
    - Resumable state: :meth:`state` (step, config hash, net, EMA, optimizer, schedule, shift,
      global RNG, REPA) is what ``checkpoints/latest.pt`` holds; a subclass adds what it mutates
      with ``super().state() | {...}`` and restores it in :meth:`load_extra_state`, which
      :meth:`try_resume` calls after loading the flow trainer's own state (after ``__init__``:
      weights loaded there replace those built there). :meth:`config_hash` is checked on resume.
    - :meth:`extra_metrics` (main rank, at log lines): the subclass's metrics averaged since the
      last line; it must reset its window.
    - Sampling hooks (main rank only): :meth:`_generator_fn` returns ``gen(prompts, seeds) ->
      images in [-1, 1]`` whose noise is a function of each seed alone (``trainers.sampling``),
      used by :meth:`evaluate` (``evals/step_*.npz``, ``eval/*`` metrics) and
      :meth:`save_samples` (``samples/``); :meth:`grid_loss` gives evaluation values that need
      no sampling; :meth:`sample_meta` adds sample manifest fields, :meth:`export_info`
      ``final/harness.json`` fields; :attr:`sample_shift` is the shift sampling uses.
    - Run directory: only through :class:`RunDir` (``metrics.jsonl``, ``checkpoints/``,
      ``samples/``, ``evals/``, ``final/``), on the main rank; a resumed run first drops the
      records of steps after its checkpoint.
    """

    def __init__(self, cfg: FlowConfig, run: RunDir, dist_: Dist):
        self.cfg, self.run, self.dist = cfg, run, dist_
        self.device = dist_.device
        self.stop_requested = False
        if cfg.train.batch_size % dist_.world:
            raise ConfigError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by {dist_.world} ranks"
            )
        # Initial weights (text encoder, then denoiser) come from the global RNG seeded here;
        # keep anything that a training choice (timesteps, REPA, ...) builds after build_net,
        # so that configurations sharing a seed start from the same denoiser (paired seeds).
        torch.manual_seed(cfg.seed)
        self.data = self.load_training_data()
        # Curriculum stages (one stage at data.resolution without a curriculum); the shift is
        # that of the current stage's resolution, recomputed when a stage starts.
        self.stages = stages(cfg)
        self.stage: Stage = self.stages[0]
        self.patch_size = config_patch_size(cfg)
        validate_curriculum(cfg, self.patch_size)
        self.shift = self.shift_at(self.stage.resolution)
        self.net = self.build_net().to(self.device)
        denoiser = self.net.denoiser
        self.patch_size = denoiser_patch_size(denoiser)  # the built model's is authoritative
        validate_curriculum(cfg, self.patch_size)
        self.shift = self.shift_at(self.stage.resolution)
        # Samples, evaluation and the export run at data.resolution; their default shift is
        # the training rule's there (the last stage's when it is full resolution).
        self.full_shift = self.shift_at(cfg.data.resolution)
        if cfg.model.backbone in CHANNELS_LAST_BACKBONES:
            denoiser.to(memory_format=torch.channels_last)
        # The trained parameters, by name: the optimizer, the gradient clipping and the EMA see
        # these alone (a LoRA fine-tune trains its adapters, not the frozen base weights).
        self.trainable_names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise ConfigError("the model has no trainable parameter; nothing would be trained")
        # foreach: one kernel per op over every parameter instead of a Python loop per tensor.
        self.ema = EMAModel(self.trainable_parameters(), decay=cfg.train.ema_decay, foreach=True)
        self.ema_net = self.net.ema_copy()
        # REPA's projector trains with the model (same optimizer, checkpointed) but is no part
        # of the model: not in the EMA, not exported. Built after the EMA copy so that the copy
        # does not inherit the block hook.
        self.repa: Repa | None = None
        self._repa_window: list[float] = []
        if cfg.repa.weight > 0:
            self.repa = build_repa(cfg.repa, denoiser).to(self.device)
            self.repa.encoder.module.to(self.device)
        self.params = self.trainable_parameters()
        if self.repa is not None:
            self.params += list(self.repa.parameters())
        self.opt = torch.optim.AdamW(
            self.params,
            lr=cfg.train.lr,
            betas=cfg.train.betas,
            weight_decay=cfg.train.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),  # one fused kernel for the whole step
        )
        warmup = cfg.train.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.order = BatchOrder(len(self.data.x), cfg.train.batch_size, cfg.seed)
        self.model = self._wrap(self.net)
        self.step = 0
        self.evaluator: Any = None
        # Built now (main rank: the only one that samples) so that a bad enhancer fails before
        # training, not at the first evaluation.
        self.enhancer = self._build_enhancer() if dist_.main else None

    def seq_len(self, resolution: int) -> int:
        """Tokens per image the denoiser sees at ``resolution`` (pixels per side): patches
        for a transformer, latent cells for the UNet (``trainers.timesteps.image_seq_len``)."""
        _, h, w = self.data.sample_shape
        # A VAE's latents are h / data.resolution times smaller than the pixels.
        lh = h * resolution // self.cfg.data.resolution
        lw = w * resolution // self.cfg.data.resolution
        return image_seq_len(lh, lw, self.patch_size)

    def shift_at(self, resolution: int, shift: float | str | None = None) -> float:
        """The numeric shift at ``resolution``: ``shift`` (default ``timesteps.shift``)
        resolved with the token count there (``auto`` / ``flux`` depend on it)."""
        rule = self.cfg.timesteps.shift if shift is None else shift
        # Only flux needs the token count (and with it a resolution the patch size divides).
        seq_len = self.seq_len(resolution) if rule == "flux" else None
        return resolve_shift_value(self.cfg.timesteps, rule, resolution, seq_len)

    def sync_stage(self, announce: bool = True) -> None:
        """Enter the curriculum stage of ``self.step`` if it is not the current one: its
        shift, and a log line on the main rank."""
        stage = stage_at(self.stages, self.step)
        if stage == self.stage:
            return
        self.stage = stage
        self.shift = self.shift_at(stage.resolution)
        if announce and self.dist.main:
            self.announce_stage()

    def announce_stage(self) -> None:
        """Log the current curriculum stage (no line without a curriculum)."""
        if not getattr(self.cfg, "curriculum", None):
            return
        s = self.stage
        words = "all" if s.caption_attributes is None else str(s.caption_attributes)
        print(
            f"curriculum stage {s.index} (steps {s.start} to {s.end - 1}) at step {self.step}: "
            f"resolution {s.resolution}, caption attributes {words}, shift {self.shift:.4g}",
            flush=True,
        )

    def curriculum_metrics(self) -> dict[str, float]:
        """``train/curriculum_stage``, ``train/resolution``, ``train/shift`` of the step just
        taken, and the cumulative compute proxies ``train/pixels_seen`` (images x pixels per
        side^2, one channel) and ``train/tokens_seen`` (images x denoiser tokens)."""
        stage = stage_at(self.stages, self.step - 1)
        batch = self.cfg.train.batch_size
        tokens = pixels_seen(self.stages, self.step, batch, per_image=self.seq_len)
        return {
            "train/curriculum_stage": float(stage.index),
            "train/resolution": float(stage.resolution),
            "train/shift": self.shift_at(stage.resolution),
            "train/pixels_seen": float(pixels_seen(self.stages, self.step, batch)),
            "train/tokens_seen": float(tokens),
        }

    def _build_enhancer(self) -> Any:
        from trainers.enhance import EnhancerError, build_enhancer

        try:
            enhancer = build_enhancer(self.cfg.sample.prompt_enhancer)
        except EnhancerError as err:
            raise ConfigError(f"sample.prompt_enhancer: {err}") from None
        if enhancer is not None:
            print(f"prompt enhancer: {json.dumps(enhancer.provenance())}", flush=True)
        return enhancer

    def enhance(self, prompts: Sequence[str]) -> list[str]:
        """The prompts the model is given: ``sample.prompt_enhancer``'s rewrites, or as is."""
        return list(prompts) if self.enhancer is None else self.enhancer.enhance(prompts)

    def load_training_data(self) -> TrainData:
        """The images and captions trained on (before :meth:`build_net`): ``data:``'s."""
        return load_data(self.cfg, self.device)

    def build_net(self) -> FlowNet:
        """The model to train: a freshly initialised backbone and the configured text encoder."""
        cfg = self.cfg
        text_encoder = build_text_encoder(cfg.text, self.data.vocabulary).to(self.device)
        c, h, _ = self.data.sample_shape
        denoiser = build_denoiser(
            cfg.model.backbone,
            cfg.model.preset,
            sample_size=h,
            channels=c,
            text_dim=text_encoder.dim,
            pooled_dim=text_encoder.pooled_dim,
            overrides=cfg.model.overrides,
        )
        return FlowNet(denoiser, text_encoder)

    def trainable_parameters(self, net: nn.Module | None = None) -> list[nn.Parameter]:
        """The parameters training updates, in a fixed order: those of ``self.net`` that
        required gradients when the model was built (:meth:`build_net` decides: a frozen text
        encoder, LoRA's frozen base weights are left out); ``net``: the same-named parameters
        of a copy of it (the EMA model)."""
        params = dict((net or self.net).named_parameters())
        return [params[n] for n in self.trainable_names]

    def config_hash(self) -> str:
        """The hash of the config this trainer was started with (checkpoints carry it)."""
        return self.cfg.hash()

    def _wrap(self, net: FlowNet) -> nn.Module:
        model: nn.Module = net
        if self.cfg.train.compile:
            # The denoiser alone, in place: the text encoder takes Python strings (a new caption
            # list would recompile the graph each step), and in-place compile keeps the
            # state_dict keys (no ``_orig_mod.`` prefix in checkpoints and exports).
            net.denoiser.compile()
        if self.dist.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(net, device_ids=ids)
        return model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.train.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def autocast(self) -> torch.autocast:
        """The training forward's autocast context (bf16 when :attr:`autocast_dtype` says)."""
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    # -- checkpoints ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "config_hash": self.config_hash(),
            "net": self.net.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "shift": self.shift,
            "torch_rng": torch.get_rng_state(),
        } | ({"repa": self.repa.state_dict()} if self.repa is not None else {})

    def save_checkpoint(self) -> None:
        if self.dist.main:
            self.run.save_checkpoint(self.state())
        self._barrier()

    def try_resume(self) -> bool:
        ckpt = self.run.load_checkpoint()
        if ckpt is None:
            return False
        if ckpt["config_hash"] != self.config_hash():
            raise ConfigError(
                f"{self.run.checkpoint} was written by a different config "
                f"(hash {ckpt['config_hash']}, this one is {self.config_hash()}); "
                "use a new --run-dir or delete the old run directory"
            )
        self.net.load_state_dict(ckpt["net"])
        if self.repa is not None:
            self.repa.load_state_dict(ckpt["repa"])
        self.ema.load_state_dict(ckpt["ema"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        self.load_extra_state(ckpt)
        torch.set_rng_state(ckpt["torch_rng"])
        self.step = int(ckpt["step"])
        self.sync_stage(announce=False)  # Session's start line shows the stage's shift
        if self.dist.main:
            self.run.truncate_after(self.step)
        return True

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        """What a subclass adds to :meth:`state` beyond the flow trainer's own."""

    # -- one step ---------------------------------------------------------------------------
    def draw_batch(
        self, step: int, gens: StepGenerators | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's batch indices [B_local] of step ``step`` and their caption-dropout mask
        [B_local] bool: functions of (seed, step, rank) alone."""
        if gens is None:
            gens = step_generators(self.cfg.seed, step, self.dist.rank)
        idx = self.order.indices(step, self.dist.rank, self.dist.world)
        drop = torch.rand(len(idx), generator=gens.dropout) < self.cfg.text.cfg_dropout
        return idx, drop

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (loss, grad norm). Raises NonFiniteLoss."""
        cfg = self.cfg
        with self.autocast():
            out, x0 = self.flow_loss()
            loss = out.loss
            if self.repa is not None:  # the hook captured block repa.layer in that forward
                align = self.repa.loss(self._pixels(x0), self.repa.grid(*x0.shape[-2:]))
                self._repa_window.append(self._all_reduce_mean(align.detach().float()))
                loss = loss + cfg.repa.weight * align
        # train/loss stays the flow loss alone, comparable with runs without REPA.
        reduced = self._all_reduce_mean(out.loss.detach().float())
        if not math.isfinite(reduced) or not math.isfinite(sum(self._repa_window[-1:])):
            raise NonFiniteLoss(f"non-finite loss ({reduced}) at step {self.step + 1}")
        grad_norm = self.optimizer_step(loss)
        return reduced, grad_norm

    def flow_loss(self) -> tuple[FlowLoss, torch.Tensor]:
        """The flow-matching loss of this step's batch (its draws from :func:`step_generators`:
        batch, caption dropout, t, noise), and the batch's clean images ``x0``; call it inside
        :meth:`autocast`."""
        self.sync_stage()
        stage = self.stage
        gens = step_generators(self.cfg.seed, self.step, self.dist.rank)
        idx, drop = self.draw_batch(self.step, gens)
        x0 = downsample(self.data.batch(idx, self.device), self.stage_side(stage))
        captions = [
            "" if d else self.data.captions[i]
            for i, d in zip(idx.tolist(), drop.tolist(), strict=True)
        ]
        if stage.caption_attributes is not None:
            # Its own stream: the other draws of the step are the same with or without it.
            g = purpose_generator(self.cfg.seed, self.step, self.dist.rank, "captions")
            captions = partial_captions(captions, stage.caption_attributes, g)
        out = flow_matching_loss(
            lambda x, t: self.model(x, t, captions),
            x0,
            self.cfg.timesteps,
            self.shift,
            gens.flow(),
        )
        return out, x0

    def stage_side(self, stage: Stage) -> int:
        """The side of the training inputs in ``stage`` (pixels; stages below data.resolution
        are refused for latent data, so latents keep their side)."""
        return self.data.sample_shape[1] * stage.resolution // self.cfg.data.resolution

    def optimizer_step(self, loss: torch.Tensor) -> float:
        """Back-propagate ``loss``, clip, step the optimizer, the schedule and the EMA, count
        the step; returns the gradient norm before clipping."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.repa is not None and self.dist.world > 1:
            # The projector lives outside DDP: average its gradients by hand.
            for p in self.repa.parameters():
                dist.all_reduce(p.grad)
                p.grad /= self.dist.world
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        self.opt.step()
        self.sched.step()
        self.ema.step(self.params[: len(self.trainable_names)])
        self.step += 1
        return grad_norm

    def _pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """The clean images for the REPA encoder: latents are decoded by the frozen VAE."""
        return self.data.vae.decode(x0) if self.data.latent else x0

    def extra_metrics(self) -> dict[str, float]:
        """Metrics logged with each ``train/loss`` line beyond the flow trainer's own."""
        return self._repa_metrics()

    def _repa_metrics(self) -> dict[str, float]:
        """``train/repa_loss``: mean -cos of the steps since the last log line."""
        if not self._repa_window:
            return {}
        value = sum(self._repa_window) / len(self._repa_window)
        self._repa_window.clear()
        return {"train/repa_loss": value}

    def _all_reduce_mean(self, x: torch.Tensor) -> float:
        if self.dist.world > 1:
            x = x.clone()
            dist.all_reduce(x)
            x /= self.dist.world
        return float(x)

    def _agree_to_stop(self) -> bool:
        """Every rank stops at the same step, even if SIGTERM reached them at different steps."""
        if self.dist.world == 1:
            return self.stop_requested
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _barrier(self) -> None:
        if self.dist.world > 1:
            dist.barrier()

    # -- evaluation and samples ---------------------------------------------------------------
    def ema_model(self) -> FlowNet:
        self.ema.copy_to(self.trainable_parameters(self.ema_net))
        return self.ema_net

    def evaluate(self) -> dict[str, float]:
        """The EMA model's ``eval/flow_loss`` (any data) and domain metrics of its samples
        (embedded data only), logged at the current step; the domain evaluation's per-image
        results go to ``evals/step_{step:07d}.npz`` (``trainers/evaluate.py``)."""
        if not self.dist.main:
            return {}
        net = self.ema_model()
        values = self.grid_loss(net)
        if self.cfg.data.kind == "shapes":
            from trainers.evaluate import ShapesEvaluator

            if self.evaluator is None:
                self.evaluator = ShapesEvaluator(self.cfg, self.device)
            gen = self._generator_fn(
                net, self.cfg.eval.solver, self.cfg.eval.steps, self.cfg.eval.guidance
            )
            values |= self.evaluator.run(
                lambda prompts, seeds: gen(self.enhance(prompts), seeds),
                images_path=self.run.eval_images(self.step),
                step=self.step,
            )
        self.run.log_metrics(self.step, values)
        return values

    def grid_loss(self, net: FlowNet) -> dict[str, float]:
        """``eval/flow_loss``: the velocity loss on a fixed t grid over the first
        ``eval.loss_images`` training images (fixed noise), and its value per t level."""
        n = min(self.cfg.eval.loss_images, len(self.data.captions))
        if n == 0:
            return {}
        idx = torch.arange(n)
        x0 = self.data.batch(idx, self.device)
        captions = self.data.captions[:n]
        per_level = grid_flow_loss(
            lambda x_t, t, rows: net(x_t, t, captions[rows]),
            x0,
            self.cfg.eval.loss_levels,
            seed=self.cfg.seed,
            batch_size=self.cfg.train.batch_size,
        )
        levels = self.cfg.eval.loss_levels
        out = {"eval/flow_loss": float(per_level.mean())}
        out |= {
            f"eval/flow_loss@t{(k + 0.5) / levels:.3g}": float(v) for k, v in enumerate(per_level)
        }
        return out

    def _generator_fn(self, net: FlowNet, solver: str, steps: int, guidance: float):
        def gen(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
            return generate_images(
                net.denoiser,
                net.text_encoder,
                prompts,
                seeds,
                self.data.sample_shape,
                steps=steps,
                solver=solver,
                guidance=guidance,
                shift=self.sample_shift,
                vae=self.data.vae,
            )

        return gen

    def sample_meta(self) -> dict[str, Any]:
        """Extra manifest fields of the saved samples (a subclass's)."""
        return {}

    @property
    def sample_shift(self) -> float:
        """The numeric shift of samples and evaluation, at data.resolution: ``sample.shift``
        (a number, or ``auto`` / ``flux`` resolved there), else the training rule's there."""
        if self.cfg.sample.shift is None:
            return self.full_shift
        return self.shift_at(self.cfg.data.resolution, self.cfg.sample.shift)

    def save_samples(self, tag: str) -> None:
        if not self.dist.main:
            return
        from trainers.samples import sample_prompts, write_samples

        s = self.cfg.sample
        prompts = sample_prompts(self.cfg, self.data.captions)
        pairs = [(pid, p, seed) for pid, p in enumerate(prompts) for seed in s.seeds]
        given = self.enhance([p for _, p, _ in pairs])  # what the model is given
        images = self._generator_fn(self.ema_model(), s.solver, s.steps, s.guidance)(
            given, [seed for _, _, seed in pairs]
        )
        meta = {
            "step": self.step,
            "nfe": solver_nfe(s.solver, s.steps),
            "cfg": s.guidance,
            "solver": s.solver,
            "steps": s.steps,
            "shift": self.sample_shift,
        } | self.sample_meta()
        if self.enhancer is not None:
            meta["prompt_enhancer"] = self.enhancer.provenance()
        enhanced = given if self.enhancer is not None else None
        write_samples(self.run, tag, pairs, images, meta, enhanced=enhanced)

    # -- export -------------------------------------------------------------------------------
    def export(self) -> None:
        if not self.dist.main:
            return
        net = self.ema_model()
        info = {
            "config_hash": self.config_hash(),
            "step": self.step,
            "latent_shape": list(self.data.sample_shape),
            "resolution": self.cfg.data.resolution,
            "vae": self.cfg.data.vae,
            "vae_subfolder": self.cfg.data.vae_subfolder,
            "timesteps": self.cfg.timesteps.model_dump(mode="json"),
            "text_encoder": self.cfg.text.encoder,
            "weights": "ema",
        } | self.export_info()
        if getattr(self.cfg, "curriculum", None):  # the shift each stage trained with
            info["curriculum"] = [
                dataclasses.asdict(st) | {"shift": self.shift_at(st.resolution)}
                for st in self.stages
            ]
        if isinstance(self.cfg.sample.shift, str):  # auto / flux: the number samples used
            info["sample_shift"] = self.sample_shift
        if self.enhancer is not None:  # what the samples and evaluations were rendered with
            info["prompt_enhancer"] = self.enhancer.provenance()
        save_export(
            self.run.final,
            self.export_denoiser(net),
            net.text_encoder,
            shift=self.full_shift,
            info=info,
        )

    def export_denoiser(self, net: FlowNet) -> nn.Module:
        """The denoiser written to ``final/transformer`` (a LoRA fine-tune merges its adapters)."""
        return net.denoiser

    def export_info(self) -> dict[str, Any]:
        """Extra ``harness.json`` fields (a subclass's)."""
        return {}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> None:
        cfg = self.cfg.train
        ecfg = self.cfg.eval
        last = self.stages[-1]
        if self.dist.main and last.resolution < self.cfg.data.resolution:
            print(
                f"warning: the last curriculum stage trains at {last.resolution} px but "
                f"samples, evaluation and the export run at data.resolution "
                f"{self.cfg.data.resolution}",
                flush=True,
            )
        if self.dist.main:
            self.announce_stage()
        progress = Progress(total=cfg.steps, start=self.step, enabled=self.dist.main)
        window_loss, window_n, window_t0 = 0.0, 0, time.perf_counter()
        with progress:
            while self.step < cfg.steps:
                if self._agree_to_stop():
                    raise KeyboardInterrupt
                loss, grad_norm = self.train_step()
                window_loss, window_n = window_loss + loss, window_n + 1
                progress.update(self.step, loss)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = time.perf_counter() - window_t0
                    ips = window_n * cfg.batch_size / max(elapsed, 1e-9)
                    if self.dist.main:
                        self.run.log_metrics(
                            self.step,
                            {
                                "train/loss": window_loss / window_n,
                                "train/images_per_s": ips,
                                "train/lr": self.sched.get_last_lr()[0],
                                "train/grad_norm": grad_norm,
                            }
                            | self.curriculum_metrics()
                            | self.extra_metrics(),
                        )
                    progress.set_rate(ips)
                    progress.log_line(self.step, window_loss / window_n, ips)
                    window_loss, window_n = 0.0, 0
                    window_t0 = time.perf_counter()
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
                if self.step % ecfg.every == 0 and self.step < cfg.steps:
                    self._eval_and_samples()
                    window_t0 = time.perf_counter()  # keep evaluation out of images/s
                elif ecfg.samples_every and self.step % ecfg.samples_every == 0:
                    self.save_samples(f"step_{self.step:06d}")
        self.save_checkpoint()

    def _eval_and_samples(self) -> None:
        self.evaluate()
        self.save_samples(f"step_{self.step:06d}")
        self._barrier()

    def weight_hashes(self) -> list[str]:
        """Hash of the exported (EMA) backbone weights on every rank: DDP ranks must agree."""
        mine = state_dict_hash(self.ema_model().denoiser.transformer.state_dict())
        if self.dist.world == 1:
            return [mine]
        hashes: list[Any] = [None] * self.dist.world
        dist.all_gather_object(hashes, mine)
        return hashes

    def finish(self) -> dict[str, Any]:
        hashes = self.weight_hashes()
        self.export()
        values = self.evaluate()
        self.save_samples("final")
        self._barrier()
        return {"metrics": values, "rank_weight_hashes": hashes, "world_size": self.dist.world}


# ----------------------------------------------------------------------------------------------
# entry point


def parse_args(
    argv: Sequence[str] | None,
    prog: str = "python -m trainers.flow",
    description: str = "Train a text-to-image rectified-flow model and write its run directory.",
) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example: {prog} --config CONFIG.json --run-dir runs/NAME",
    )
    p.add_argument("--config", required=True, help="JSON trainer config (see trainers/config.py)")
    p.add_argument(
        "--run-dir", required=True, help="run directory; an existing checkpoint there is resumed"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


class Session:
    """What the signal handler and the error paths need: the trainer, once it exists."""

    def __init__(
        self,
        cfg: Any,
        run: RunDir,
        dist_: Dist,
        make_trainer: Callable[[Any, RunDir, Dist], FlowTrainer] = FlowTrainer,
    ):
        self.cfg, self.run, self.dist = cfg, run, dist_
        self.make_trainer = make_trainer
        self.trainer: FlowTrainer | None = None

    def on_signal(self, signum: int, _frame: Any) -> None:
        if self.trainer is None:
            raise KeyboardInterrupt  # still setting up: nothing to checkpoint
        self.trainer.stop_requested = True  # checked between steps, so a step is never torn

    @property
    def step(self) -> int:
        return self.trainer.step if self.trainer else 0

    def run_to_end(self) -> int:
        cfg, run, dist_ = self.cfg, self.run, self.dist
        try:
            _check_config_matches(cfg, run, dist_)
            self.trainer = trainer = self.make_trainer(cfg, run, dist_)
            resumed = trainer.try_resume()
            if dist_.main and not resumed:
                # A killed attempt that never checkpointed leaves records past step 0 (maybe a
                # torn last line): this attempt redoes them from the start.
                run.truncate_after(0)
            if dist_.main:
                # log.trackers (TensorBoard, W&B): mirrors of every metric logged through run.
                run.trackers = open_trackers(
                    getattr(cfg, "log", LogConfig()).trackers,
                    run.root,
                    config=cfg.to_dict(),
                    resume_step=trainer.step if resumed else 0,
                )
                run.clear_status()
                n = count_parameters(trainer.net.denoiser)
                what = f"resuming at step {trainer.step}" if resumed else "starting"
                print(
                    f"{what}: {trainer.cfg.model.backbone}/{trainer.cfg.model.preset} "
                    f"{n / 1e6:.2f}M params, "
                    f"shift {trainer.shift:.3f}, device {dist_.device}, world {dist_.world}",
                    flush=True,
                )
            trainer.fit()
            summary = trainer.finish()
            if dist_.main:
                run.write_status("ok", trainer.step, **summary)
            return EXIT_OK
        except KeyboardInterrupt:
            if self.trainer is not None:
                self.trainer.save_checkpoint()
            if dist_.main:
                run.write_status(
                    "stopped", self.step, "stopped by signal; rerun the same command to resume"
                )
                print(f"stopped at step {self.step}; checkpoint saved", flush=True)
            return EXIT_OK
        except NonFiniteLoss as err:
            return self.fail(str(err), EXIT_FAILED)
        except (ConfigError, DataError, WeightsError) as err:
            return self.fail(str(err), EXIT_BAD_INPUT)
        except KeyError as err:  # unknown registry names carry their own "did you mean" message
            return self.fail(str(err.args[0]) if err.args else repr(err), EXIT_BAD_INPUT)
        except Exception as err:
            traceback.print_exc()
            oom = isinstance(err, torch.OutOfMemoryError)
            return self.fail(
                f"{'out of memory: ' if oom else ''}{type(err).__name__}: {err}", EXIT_FAILED
            )
        finally:
            close_trackers(run.trackers)
            run.trackers = []

    def fail(self, reason: str, code: int) -> int:
        print(f"error: {reason}", file=sys.stderr, flush=True)
        try:
            prior = self.run.read_status()
        except ValueError:  # a damaged status.json: replaced below like any other
            prior = None
        if isinstance(prior, dict) and prior.get("status") == "ok":
            # run_to_end clears the status once it resumed, so "ok" still there means this launch
            # never started (a finished run relaunched, e.g. on a corrupt checkpoint): keep it.
            print(f"note: {self.run.status} still says ok; left unchanged", file=sys.stderr)
            return code
        if self.dist.main:
            self.run.create()
            self.run.write_status("failed", self.step, reason)
        return code


def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m trainers.flow",
    description: str = "Train a text-to-image rectified-flow model and write its run directory.",
    load: Callable[[str], Any] = load_config,
    make_trainer: Callable[[Any, RunDir, Dist], FlowTrainer] = FlowTrainer,
) -> int:
    """The trainer process: parse arguments, load the config, train, write the run directory.
    The distillation trainer reuses it with its own config loader and trainer class."""
    args = parse_args(argv, prog, description)
    run = RunDir(args.run_dir)
    try:
        cfg = load(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    dist_ = init_distributed(args.device)
    if dist_.main:
        run.create()
        if not os.environ.get("HARNESS_CAPTURED"):
            tee_output(run.stdout, run.stderr)
    session = Session(cfg, run, dist_, make_trainer)
    signal.signal(signal.SIGTERM, session.on_signal)
    signal.signal(signal.SIGINT, session.on_signal)
    try:
        return session.run_to_end()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _check_config_matches(cfg: Any, run: RunDir, dist_: Dist) -> None:
    """config.json in the run dir is the record of what ran; a different config is refused."""
    existing = run.read_config()
    if existing is not None and existing.get("config_hash") not in (None, cfg.hash()):
        raise ConfigError(
            f"{run.config} holds a different config "
            f"(hash {existing.get('config_hash')}, this one is "
            f"{cfg.hash()}); use a new --run-dir, or delete the old run directory"
        )
    if dist_.main and existing is None:
        run.write_config(cfg.to_dict(), cfg.hash())
