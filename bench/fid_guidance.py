"""Domain FID and attribute accuracy of a study's finished trials at several guidance scales.

    uv run python bench/fid_guidance.py --workdir work --study timestep --guidance 1,1.5,2,3

Loads each trial's exported model (``runs/<study>/<trial>/final``), renders the evaluation
prompts the trainer uses (``trainers.evaluate.ShapesEvaluator``: same prompts, seeds and
reference statistics) at each guidance scale, and prints domain FID, attribute accuracy and the
mean norm of the attribute network's features (real images: about 61). It is how the default
study's evaluation guidance was chosen (bench/BENCHMARKS.md, "Domain FID and guidance").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from trainers.config import FlowConfig
from trainers.evaluate import ShapesEvaluator
from trainers.export import load_export


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("work"))
    ap.add_argument("--study", default="timestep")
    ap.add_argument("--guidance", default="1,1.5,2,3", help="comma-separated scales")
    args = ap.parse_args()
    scales = [float(g) for g in args.guidance.split(",")]
    trials = sorted(p for p in (args.workdir / "runs" / args.study).iterdir() if p.is_dir())
    print("| trial | timesteps | guidance | domain_fid | attr_acc_mean | feature norm |")
    print("|---:|---|---:|---:|---:|---:|")
    for run_dir in trials:
        if not (run_dir / "final" / "harness.json").is_file():
            continue
        cfg = FlowConfig.model_validate(json.loads((run_dir / "config.json").read_text()))
        model = load_export(run_dir / "final")
        evaluator = ShapesEvaluator(cfg, torch.device("cpu"))
        ts = cfg.timesteps
        for g in scales:
            captured: list[torch.Tensor] = []

            def generate(prompts, seeds, g=g, captured=captured, model=model, cfg=cfg):
                images = model.generate(prompts, seeds, steps=cfg.eval.steps, guidance=g)
                captured.append(images)
                return images

            values = evaluator.run(generate)
            with torch.no_grad():
                norm = float(evaluator.net.features(captured[0]).norm(dim=1).mean())
            print(
                f"| {run_dir.name} | {ts.sampler} shift {ts.shift:g} | {g:g} | "
                f"{values['domain_fid']:.1f} | {values['attr_acc_mean']:.3f} | {norm:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
