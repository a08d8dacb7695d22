"""Each configuration's change from the starting model, over seeds, for a preference study.

The study report compares configurations with the baseline; this asks the other question a
preference run raises: did the tuned model move from where it started? Every preference run is
evaluated before its first step (the same starting model for every seed) and at its end, so the
per-seed change is final - start and its 95% interval is Student t over seeds.

    uv run python bench/preference_gain.py /tmp/prefwork preference
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

METRICS = (
    "reward/attribute/heldout",
    "reward/attribute/train",
    "reward/realism/heldout",
    "domain_fid",
)

SHOWN = ("noise_level", "group_size", "kl_weight", "beta", "pairs", "weight")
"""The method settings the studies vary, shown in the configuration column."""


def gains(run_dir: Path) -> dict[str, float]:
    first: dict[str, float] = {}
    last: dict[str, tuple[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["name"] in METRICS and r["value"] is not None:
            if r["step"] == 0:
                first[r["name"]] = r["value"]
            if r["name"] not in last or r["step"] >= last[r["name"]][0]:
                last[r["name"]] = (r["step"], r["value"])
    return {m: last[m][1] - first[m] for m in METRICS if m in first and m in last}


def main(workdir: str, study: str) -> None:
    root = Path(workdir) / "runs" / study
    print("| trial | config | " + " | ".join(METRICS) + " |")
    print("|---|---|" + "---|" * len(METRICS))
    for trial in sorted(p for p in root.iterdir() if p.is_dir()):
        seeds = sorted(p for p in trial.iterdir() if (p / "metrics.jsonl").is_file())
        per = [gains(s) for s in seeds]
        cfg = json.loads((seeds[0] / "config.json").read_text())
        settings = cfg.get(cfg["method"], {})
        label = " ".join([cfg["method"], *(f"{k}={settings[k]}" for k in SHOWN if k in settings)])
        cells = []
        for m in METRICS:
            x = np.array([g[m] for g in per if m in g])
            if len(x) < 2:
                cells.append("-")
                continue
            half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
            lo, hi = x.mean() - half, x.mean() + half
            verdict = "up" if lo > 0 else "down" if hi < 0 else "not resolved"
            cells.append(f"{x.mean():+.4g} [{lo:+.4g}, {hi:+.4g}] {verdict}")
        print(f"| {trial.name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
