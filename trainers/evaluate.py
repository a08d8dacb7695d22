"""Periodic evaluation for the embedded data: domain FID and prompt following of EMA samples.

Seen compositions (val split prompts) give ``domain_fid`` (against real val images) and the
per-attribute accuracies; held-out compositions (never in training) give ``heldout_*``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from trainers.config import FlowConfig
from trainers.data.shapes import sample_attrs

GenerateFn = Callable[[Sequence[str], Sequence[int]], torch.Tensor]

# Offset so that the evaluation prompts are not the sample-grid prompts (those start at 0).
_EVAL_INDEX_OFFSET = 100_000


class ShapesEvaluator:
    def __init__(self, cfg: FlowConfig, device: torch.device):
        from evaluators.domain import DomainMetrics, load_attribute_net, reference_stats

        self.net = load_attribute_net(device=device)
        ref = reference_stats(
            self.net,
            seed=cfg.data.seed,
            split="val",
            size=cfg.eval.reference_images,
            resolution=cfg.data.resolution,
        )
        n = cfg.eval.num_images
        self.seen = [sample_attrs(cfg.data.seed, "val", _EVAL_INDEX_OFFSET + i) for i in range(n)]
        self.heldout = [
            sample_attrs(cfg.data.seed, "heldout", _EVAL_INDEX_OFFSET + i)
            for i in range(max(2, n // 2))
        ]
        self.reference = ref  # (mean, covariance) of the real images' features
        self._metrics = lambda: DomainMetrics(self.net, ref)

    def run(self, generate: GenerateFn) -> dict[str, float]:
        out: dict[str, float] = {}
        for prefix, items in (("", self.seen), ("heldout_", self.heldout)):
            images = generate([a.caption for a in items], list(range(len(items))))
            metrics = self._metrics()
            metrics.update(images, torch.tensor([a.labels for a in items]))
            values = metrics.compute()
            if prefix:  # FID needs the seen distribution; held-out prompts report accuracy only
                values = {k: v for k, v in values.items() if k.startswith("attr_")}
            out.update({prefix + k: float(v) for k, v in values.items()})
        return out
