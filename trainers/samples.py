"""The fixed sample prompt set and writing samples (PNG, lossless) with their manifest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from trainers.config import FlowConfig
from trainers.data.shapes import to_uint8
from trainers.rundir import RunDir


def sample_prompts(cfg: FlowConfig, captions: Sequence[str]) -> list[str]:
    """``sample.prompts`` if given; else a fixed set that depends only on the data config.

    Embedded data: alternating seen (val split) and held-out compositions, so every sample grid
    shows compositional generalisation too. Image folder: its first distinct captions."""
    s = cfg.sample
    if s.prompts:
        return list(s.prompts)
    if cfg.data.kind == "shapes":
        from trainers.data.shapes import sample_attrs

        out = []
        for i in range(s.num_prompts):
            split = "val" if i % 2 == 0 else "heldout"
            out.append(sample_attrs(cfg.data.seed, split, i // 2).caption)
        return out
    return list(dict.fromkeys(captions))[: s.num_prompts]


def write_samples(
    run: RunDir,
    tag: str,
    pairs: Sequence[tuple[int, str, int]],
    images: torch.Tensor,
    meta: dict[str, Any],
    enhanced: Sequence[str] | None = None,
) -> None:
    """Save images [N, 3, H, W] in [-1, 1] under samples/<tag>/ and append manifest records.

    pairs: (prompt_id, prompt, seed) per image; meta: step, nfe, cfg (guidance), solver, ...;
    enhanced: the prompt each image was generated from when a prompt enhancer rewrote
    ``prompt`` (recorded as ``enhanced_prompt``; ``prompt`` stays the original).
    """
    if enhanced is not None and len(enhanced) != len(pairs):
        raise ValueError(f"{len(enhanced)} enhanced prompts for {len(pairs)} samples")
    folder = run.samples / tag
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images).permute(0, 2, 3, 1).numpy()
    records = []
    for i, ((pid, prompt, seed), px) in enumerate(zip(pairs, pixels, strict=True)):
        name = f"p{pid:03d}_s{seed}.png"
        Image.fromarray(px).save(folder / name)
        rel = f"{tag}/{name}"
        record = {"prompt_id": pid, "prompt": prompt, "seed": seed, "path": rel, "tag": tag}
        if enhanced is not None:
            record["enhanced_prompt"] = enhanced[i]
        records.append(record | meta)
    run.append_manifest(records)
