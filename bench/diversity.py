"""Within-prompt diversity of generated images against the data's, in the attribute network's
feature space: does a model draw one caption always the same way?

    uv run python bench/diversity.py --workdir work --runs distill/0000,distill/0007 --seeds 16

For each of ``--prompts`` captions of the embedded val split (the evaluation's kind of prompt)
it renders ``--seeds`` images per model and takes the mean per-dimension variance of their
attribute-network features (the features domain FID uses); the data's figure is the same
statistic over real training images with that caption. A model with a much lower figure
than the data draws each caption with less variation in size, position and rendering than the
data has (mode-seeking), which domain FID counts and per-image attribute accuracy does not.
Students sample at their own step count (harness.json); other exports at ``--steps`` and
``--guidance``.

A second table splits each model's domain FID (the trainer's evaluation: the same 128 val
prompts and seeds, 2000 real reference images) into its two terms, ``|mu - mu_r|^2`` (a shifted
mean: e.g. over-saturated images) and the covariance term, with the total feature variance
``tr(Sigma)`` against the data's (below it: the model's images are less spread out than the
data's) and the mean feature norm.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from harness.runner import Workdir
from harness.store import Store
from trainers.config import parse_config
from trainers.data.shapes import ShapesDataset, sample_attrs
from trainers.domain import frechet_distance, load_attribute_net
from trainers.evaluate import ShapesEvaluator
from trainers.export import load_export


@torch.no_grad()
def within_variance(net: torch.nn.Module, groups: list[torch.Tensor]) -> float:
    """Mean over groups of the mean per-dimension feature variance (images in [-1, 1])."""
    return float(torch.stack([net.features(g).var(0).mean() for g in groups]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("work"))
    ap.add_argument("--runs", required=True, help="comma-separated run ids, e.g. distill/0000")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25, help="sampling steps of non-students")
    ap.add_argument("--guidance", type=float, default=1.5, help="guidance of non-students")
    args = ap.parse_args()

    net = load_attribute_net().eval()
    data = ShapesDataset(seed=0, split="train", size=20000, resolution=16)
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(data.captions):
        by_caption.setdefault(c, []).append(i)
    captions = []
    k = 100_000
    while len(captions) < args.prompts:  # val prompts whose composition the data also has
        c = sample_attrs(0, "val", k).caption
        k += 1
        if len(by_caption.get(c, [])) >= args.seeds and c not in captions:
            captions.append(c)
    real = [data.images[by_caption[c][: args.seeds]].float().div(127.5).sub(1.0) for c in captions]
    print(f"| model | within-prompt feature variance ({args.prompts} prompts x {args.seeds}) |")
    print("|---|---:|")
    print(f"| data | {within_variance(net, real):.2f} |")
    store = Store(Workdir(args.workdir).store)
    models = {}
    for run_id in args.runs.split(","):
        run_dir = store.run_dir_path(  # recorded relative to the work directory
            store.query("SELECT run_dir FROM runs WHERE run_id = ?", [run_id])[0]["run_dir"]
        )
        model = load_export(run_dir / "final")
        student = model.meta.get("distill")
        steps = student["steps"] if student else args.steps
        models[run_id] = (model, steps)
        seeds = list(range(args.seeds))
        groups = [
            model.generate([c] * len(seeds), seeds, steps=steps, guidance=args.guidance)
            for c in captions
        ]
        name = f"{student['method']}-{steps}" if student else f"{run_id} at {steps} steps"
        print(f"| {name} ({run_id}) | {within_variance(net, groups):.2f} |")

    evaluator = ShapesEvaluator(
        parse_config({"data": {"resolution": 16}, "eval": {"num_images": 128}}),
        torch.device("cpu"),
    )
    mu_r, sig_r = (np.asarray(x, dtype=np.float64) for x in evaluator.reference)
    print()
    print("| model | domain FID | mean term | covariance term | tr(Sigma) (data) | feature norm |")
    print("|---|---:|---:|---:|---:|---:|")
    caps = [a.caption for a in evaluator.seen]
    for run_id, (model, steps) in models.items():
        images = model.generate(caps, list(range(len(caps))), steps=steps, guidance=args.guidance)
        with torch.no_grad():
            f = net.features(images).double().numpy()
        mu, sig = f.mean(0), np.cov(f, rowvar=False)
        fid = frechet_distance(mu, sig, mu_r, sig_r)
        mean_term = float(((mu - mu_r) ** 2).sum())
        print(
            f"| {run_id} | {fid:.1f} | {mean_term:.1f} | {fid - mean_term:.1f} | "
            f"{np.trace(sig):.0f} ({np.trace(sig_r):.0f}) | "
            f"{np.linalg.norm(f, axis=1).mean():.1f} |"
        )


if __name__ == "__main__":
    main()
