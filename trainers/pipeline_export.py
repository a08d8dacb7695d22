"""A diffusers pipeline for the harness's exports, shipped inside every export.

:func:`trainers.export.save_export` copies this file, unchanged, into the export twice: as
``harness_pipeline.py`` (the pipeline class that ``model_index.json`` names) and, for the vocab
text encoder, as ``text_encoder/vocab_text_encoder.py`` (diffusers loads a custom component's
class from a file in the component's own folder). So it must stay self-contained: it imports
torch, diffusers, transformers and the standard library only, never this project's packages (a
test checks it). Load an export with::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained("runs/<run>/final", trust_remote_code=True)
    images = pipe(["a red circle"], seeds=[0], num_inference_steps=25, guidance_scale=3.0).images

``trust_remote_code=True`` is what diffusers asks of any local directory that ships code.

The maths is the harness's sampler (``trainers/sampling.py``), written out again here because
the shipped file cannot import it; a test checks that both give the same images:

- flow convention: t = 1 is noise, t = 0 is data, the network predicts ``v = eps - x0`` and is
  called with ``timestep = 1000 t``;
- each image's initial noise is ``torch.randn(shape, generator=Generator().manual_seed(seed))``,
  so a (prompt, seed) pair gives the same image in any batch;
- the time grid is ``linspace(1, 0, steps + 1)`` with the SD3 shift ``s t / (1 + (s - 1) t)``;
- flow models: Euler (or Heun) with classifier-free guidance against the empty prompt ``""``;
- distilled students (``student_sampler`` set): their own sampler, without guidance (``ode``:
  Euler; ``consistency``: predict x0 at each grid time, re-noise it with noise drawn from
  ``(seed, k)``);
- latent-space models decode through ``vae`` (``z / scaling_factor + shift_factor``).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ConfigMixin,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    ImagePipelineOutput,
    ModelMixin,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor
from torch import Tensor, nn

__all__ = ["HarnessFlowPipeline", "VocabTextEncoder"]

TextTriple = tuple[Tensor, Tensor, Tensor]
"""(tokens [B, L, D], pooled [B, P], mask [B, L] bool), as the harness's ``TextEmbeddings``."""

STUDENT_SAMPLERS = ("ode", "consistency")
SOLVERS = ("euler", "heun")
TEXT_ENCODER_KINDS = ("vocab", "minilm", "clip", "t5")


# ----------------------------------------------------------------------------------------------
# the vocab text encoder (the harness's ``trainers.text.VocabTextEncoder``, same weights and maths)

_NON_ALNUM = re.compile(r"[^0-9a-z]+")
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2
_NUM_SPECIAL = 3


def split_words(text: str) -> list[str]:
    """The vocab encoder's tokenizer: lowercase, split on runs of non-alphanumerics."""
    return [w for w in _NON_ALNUM.split(text.lower()) if w]


class _Block(nn.Module):
    """Pre-LayerNorm transformer block with key-padding-masked self-attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(y.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class VocabTextEncoder(ModelMixin, ConfigMixin):
    """A small transformer over a word-level vocabulary (the harness's ``vocab`` encoder).

    Written by hand because no transformers model has this architecture (pre-LayerNorm blocks,
    a word-level tokenizer built from the caption vocabulary). Ids: 0 = pad, 1 = unknown word,
    2 = BOS (always first, so ``""`` is BOS alone), then the vocabulary words in order; captions
    are truncated to ``max_length - 1`` words and padded to ``max_length``.
    """

    @register_to_config
    def __init__(
        self,
        vocabulary: list[str],
        width: int = 128,
        layers: int = 2,
        heads: int = 4,
        max_length: int = 24,
    ):
        super().__init__()
        words = list(dict.fromkeys(w for entry in vocabulary for w in split_words(entry)))
        self._word_to_id = {w: i + _NUM_SPECIAL for i, w in enumerate(words)}
        self.token_embedding = nn.Embedding(len(words) + _NUM_SPECIAL, width, padding_idx=PAD_ID)
        self.position_embedding = nn.Parameter(torch.zeros(1, max_length, width))
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids [B, max_length] long and mask [B, max_length] bool, on the CPU."""
        n = self.config.max_length
        ids = torch.full((len(captions), n), PAD_ID, dtype=torch.long)
        for row, caption in enumerate(captions):
            words = split_words(caption)[: n - 1]
            seq = [BOS_ID] + [self._word_to_id.get(w, UNK_ID) for w in words]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != PAD_ID

    def forward(self, captions: Sequence[str]) -> TextTriple:
        """(tokens [B, L, D], zero at padding; pooled [B, D], the state at BOS; mask [B, L])."""
        ids, mask = self.tokenize(list(captions))
        ids, mask = ids.to(self.device), mask.to(self.device)
        x = self.token_embedding(ids) + self.position_embedding
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        return x * mask[..., None].to(x.dtype), x[:, 0], mask


# ----------------------------------------------------------------------------------------------
# the pipeline


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> Tensor:
    """[N, *shape] standard normal noise on the CPU; item i depends only on ``seeds[i]``."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def renoise_noise(seeds: Sequence[int], k: int, shape: tuple[int, ...]) -> Tensor:
    """The fresh noise of the consistency sampler's re-noising step ``k``."""
    return initial_noise([int(s) * 1_000_003 + 7919 * (k + 1) for s in seeds], shape)


def sampling_schedule(steps: int, shift: float) -> list[float]:
    """The ``steps + 1`` times visited, from 1 (noise) to 0 (data), shifted (float64).

    Computed here rather than with ``FlowMatchEulerDiscreteScheduler.set_timesteps``: its
    default grid ends at sigma = 1 / num_train_timesteps rather than 0, it keeps sigmas in
    float32 (the harness integrates over a float64 grid) and it has no Heun nor consistency
    step, so the harness's images could not be reproduced exactly with it.
    """
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        t = shift * t / (1.0 + (shift - 1.0) * t)
    return t.tolist()


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _concat_text(a: TextTriple, b: TextTriple) -> TextTriple:
    """The rows of ``a`` then those of ``b`` (a one-row ``b`` repeated to ``a``'s rows)."""

    def cat(x: Tensor, y: Tensor) -> Tensor:
        return torch.cat([x, y.expand(x.shape[0], *y.shape[1:]) if y.shape[0] == 1 else y])

    return cat(a[0], b[0]), cat(a[1], b[1]), cat(a[2], b[2])


class HarnessFlowPipeline(DiffusionPipeline):
    """Text-to-image sampling of a flow-matching model trained (or distilled) by the harness.

    Components: ``transformer`` (``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` or
    ``UNet2DConditionModel`` predicting the velocity), ``scheduler`` (a
    ``FlowMatchEulerDiscreteScheduler`` whose ``shift`` is the training shift), ``text_encoder``
    (the :class:`VocabTextEncoder`, or a transformers model with ``tokenizer``) and ``vae``
    (an ``AutoencoderKL`` when the model was trained on latents, else None).

    Config values (``model_index.json``): ``text_encoder_kind`` (vocab, minilm, clip, t5: how
    the text encoder's outputs are pooled), ``max_length`` (tokens per prompt for a transformers
    encoder), ``sample_channels`` / ``sample_height`` / ``sample_width`` (the shape the model
    samples, latents when there is a VAE), ``student_sampler`` / ``student_steps`` (set for a
    distilled student).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components: ClassVar[list[str]] = ["tokenizer", "vae"]

    def __init__(
        self,
        transformer: ModelMixin,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder: nn.Module,
        tokenizer: Any = None,
        vae: AutoencoderKL | None = None,
        text_encoder_kind: str = "vocab",
        max_length: int = 24,
        sample_channels: int = 3,
        sample_height: int = 32,
        sample_width: int = 32,
        student_sampler: str | None = None,
        student_steps: int | None = None,
    ):
        super().__init__()
        if text_encoder_kind not in TEXT_ENCODER_KINDS:
            raise ValueError(
                f"unknown text_encoder_kind {text_encoder_kind!r}; "
                f"allowed: {', '.join(TEXT_ENCODER_KINDS)}"
            )
        if student_sampler is not None and student_sampler not in STUDENT_SAMPLERS:
            raise ValueError(
                f"unknown student_sampler {student_sampler!r}; "
                f"allowed: {', '.join(STUDENT_SAMPLERS)}"
            )
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            vae=vae,
        )
        self.register_to_config(
            text_encoder_kind=text_encoder_kind,
            max_length=max_length,
            sample_channels=sample_channels,
            sample_height=sample_height,
            sample_width=sample_width,
            student_sampler=student_sampler,
            student_steps=student_steps,
        )
        # Only postprocess() is used: [-1, 1] images to "pt" / "np" in [0, 1] or "pil".
        self.image_processor = VaeImageProcessor(vae_scale_factor=1)

    # -- text ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> TextTriple:
        """(tokens [B, L, D], pooled [B, P], mask [B, L] bool), float32, on the encoder's device:
        the harness's ``TextEmbeddings`` for ``prompts``."""
        prompts = list(prompts)
        kind = self.config.text_encoder_kind
        if kind == "vocab":
            tokens, pooled, mask = self.text_encoder(prompts)
            return tokens.float(), pooled.float(), mask
        if self.tokenizer is None:
            raise ValueError(f"a {kind} text encoder needs the tokenizer component")
        device = next(self.text_encoder.parameters()).device
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with torch.autocast(device.type, enabled=False):
            out = self.text_encoder(input_ids=ids, attention_mask=mask)
            tokens = out.last_hidden_state
            if kind == "minilm":  # sentence-transformers' pooling of all-MiniLM-L6-v2
                pooled = F.normalize(_masked_mean(tokens, mask), dim=-1)
            elif kind == "clip":  # the projection when the checkpoint has one
                text_embeds = getattr(out, "text_embeds", None)
                pooled = text_embeds if text_embeds is not None else out.pooler_output
            else:  # t5
                pooled = _masked_mean(tokens, mask)
        return tokens.float(), pooled.float(), mask.bool()

    # -- the network --------------------------------------------------------------------------

    def velocity(self, x: Tensor, t: Tensor, text: TextTriple) -> Tensor:
        """The network's velocity (float32) at ``x`` [B, C, H, W], times ``t`` [B] in [0, 1]."""
        tokens, pooled, mask = text
        net = self.transformer
        dtype = net.dtype
        x = x.to(dtype)
        tokens, pooled, mask = (
            tokens.to(x.device, dtype),
            pooled.to(x.device, dtype),
            mask.to(x.device),
        )
        if isinstance(net, SD3Transformer2DModel):
            out = net(
                hidden_states=x,
                encoder_hidden_states=tokens,
                pooled_projections=pooled,
                timestep=t * 1000.0,
                return_dict=False,
            )[0]
        elif isinstance(net, PixArtTransformer2DModel):
            out = net(
                hidden_states=x,
                encoder_hidden_states=tokens,
                encoder_attention_mask=mask.to(dtype),
                timestep=t * 1000.0,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]
        elif isinstance(net, UNet2DConditionModel):
            out = net(
                sample=x,
                timestep=t * 1000.0,
                encoder_hidden_states=tokens,
                encoder_attention_mask=mask.to(dtype),
                return_dict=False,
            )[0]
        else:
            raise TypeError(f"unsupported transformer {type(net).__name__}")
        return out.float()

    def guided_velocity(
        self, x: Tensor, t: Tensor, cond: TextTriple, uncond: TextTriple | None, guidance: float
    ) -> Tensor:
        """Classifier-free guidance ``v_u + w (v_c - v_u)`` in one batched call."""
        if uncond is None or guidance == 1.0:
            return self.velocity(x, t, cond)
        v = self.velocity(torch.cat([x, x]), torch.cat([t, t]), _concat_text(cond, uncond))
        v_c, v_u = v.chunk(2)
        return v_u + guidance * (v_c - v_u)

    # -- samplers -----------------------------------------------------------------------------

    def _ode(
        self,
        noise: Tensor,
        cond: TextTriple,
        uncond: TextTriple | None,
        *,
        steps: int,
        shift: float,
        solver: str,
        guidance: float,
    ) -> Tensor:
        """Integrate dx/dt = v from t = 1 to 0 (Euler, or Heun with a last Euler step)."""
        b = noise.shape[0]

        def v(x: Tensor, t: float) -> Tensor:
            tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
            return self.guided_velocity(x, tt, cond, uncond, guidance)

        x = noise.float()
        ts = sampling_schedule(steps, shift)
        for t, t_next in self.progress_bar(list(itertools.pairwise(ts))):
            dt = t_next - t
            v0 = v(x, t)
            x_euler = x + dt * v0
            if solver == "heun" and t_next > 0:
                x = x + 0.5 * dt * (v0 + v(x_euler, t_next))
            else:
                x = x_euler
        return x

    def _consistency(
        self, noise: Tensor, text: TextTriple, seeds: Sequence[int], *, steps: int, shift: float
    ) -> Tensor:
        """Multistep consistency sampling: x0 = x - t v at each grid time, re-noised to the
        next with noise drawn per item from (seed, k), returned at t = 0."""
        x = noise.float()
        b, shape = x.shape[0], tuple(x.shape[1:])
        ts = sampling_schedule(steps, shift)
        for k, (t, t_next) in enumerate(self.progress_bar(list(itertools.pairwise(ts)))):
            tt = torch.full((b,), t, device=x.device)
            x0 = x - tt.view(-1, 1, 1, 1) * self.velocity(x, tt, text)
            if t_next <= 0:
                x = x0
            else:
                fresh = renoise_noise(seeds, k, shape).to(x.device)
                x = (1.0 - t_next) * x0 + t_next * fresh
        return x

    def decode(self, latents: Tensor) -> Tensor:
        """Samples -> images in [-1, 1] (through the VAE when there is one)."""
        if self.vae is None:
            return latents.clamp(-1.0, 1.0)
        cfg = self.vae.config
        shift_factor = 0.0 if cfg.get("shift_factor") is None else float(cfg.shift_factor)
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        z = z / float(cfg.scaling_factor) + shift_factor
        with torch.autocast(z.device.type, enabled=False):
            images = self.vae.decode(z).sample
        return images.float().clamp(-1.0, 1.0)

    # -- call ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        seeds: int | list[int] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        solver: str | None = None,
        shift: float | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int = 64,
    ) -> ImagePipelineOutput | tuple[Any]:
        """One image per (prompt, seed) pair.

        Args:
            prompt: a prompt or a list; a single prompt is repeated for every seed.
            seeds: one seed per image (default ``0, 1, ...``); an image depends only on its
                prompt and seed, whatever the batch.
            num_inference_steps: solver steps (default 25; a student's own step count).
            guidance_scale: classifier-free guidance weight against ``""`` (default 3.0). A
                distilled student samples without guidance: leave it None (or 1.0).
            solver: ``euler`` (default) or ``heun`` for a flow model; a student samples with its
                own sampler: leave it None (or name that sampler).
            shift: the time-grid shift (default: the scheduler's, i.e. the training shift).
            output_type: ``pil``, ``np`` (float [0, 1], NHWC), ``pt`` (float [0, 1], NCHW) or
                ``latent`` (the samples before the VAE, unclamped).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            batch_size: images sampled at once (the result does not depend on it).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if seeds is None:
            seeds = list(range(len(prompts)))
        seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(prompts) == 1 and len(seeds) > 1:
            prompts = prompts * len(seeds)
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cfg = self.config
        student = cfg.student_sampler
        if student is not None:
            if guidance_scale not in (None, 1.0):
                raise ValueError(
                    f"guidance_scale={guidance_scale}: this is a distilled student, it samples "
                    "without guidance (the teacher's was distilled into it); leave "
                    "guidance_scale unset"
                )
            if solver not in (None, student, *(("euler",) if student == "ode" else ())):
                raise ValueError(
                    f"solver={solver!r}: this is a distilled student, it samples with its own "
                    f"{student!r} sampler{' (Euler)' if student == 'ode' else ''}; leave solver "
                    "unset"
                )
        solver = solver or "euler"
        if student is None and solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; allowed: {', '.join(SOLVERS)}")
        default_steps = cfg.student_steps if student is not None and cfg.student_steps else 25
        steps = int(num_inference_steps or default_steps)
        guidance = 3.0 if guidance_scale is None else float(guidance_scale)
        shift = float(self.scheduler.config.shift if shift is None else shift)
        shape = (cfg.sample_channels, cfg.sample_height, cfg.sample_width)
        device = self._execution_device

        uncond = self.encode_prompt([""]) if student is None else None
        samples, images = [], []
        for i in range(0, len(prompts), batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            noise = initial_noise(s, shape).to(device)
            text = self.encode_prompt(p)
            if student == "consistency":
                x = self._consistency(noise, text, s, steps=steps, shift=shift)
            elif student == "ode":
                x = self._ode(
                    noise, text, None, steps=steps, shift=shift, solver="euler", guidance=1
                )
            else:
                x = self._ode(
                    noise, text, uncond, steps=steps, shift=shift, solver=solver, guidance=guidance
                )
            if output_type == "latent":
                samples.append(x.cpu())
            else:
                images.append(self.decode(x).clamp(-1, 1).cpu())
        self.maybe_free_model_hooks()
        if output_type == "latent":
            out: Any = torch.cat(samples)
        else:
            out = self.image_processor.postprocess(torch.cat(images), output_type=output_type)
        if not return_dict:
            return (out,)
        return ImagePipelineOutput(images=out)
