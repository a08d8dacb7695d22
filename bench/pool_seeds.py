"""Pool the seeds of two runs of one study file over disjoint training seeds, and compare each
configuration with the baseline over all of them (paired Student t over the per-seed values,
the report's own interval).

A study's seeds cannot be extended in place (`--set repeats=N` on an existing study is refused);
more seeds are a second study over the next seeds, e.g.

    uv run harness study run studies/curriculum.yaml --set name=curriculum-b --set base.seed=3
    uv run python bench/pool_seeds.py curriculum curriculum-b --param curriculum \\
        --baseline none --workdir /work/cwork

Seed k of every configuration shares its initial weights, batches and noise within a study, and
the two studies use different seeds, so the pooled per-seed differences stay paired and
independent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from harness.stats import paired_t

METRICS = ("domain_fid", "attr_acc_mean", "heldout_attr_acc_mean", "eval/flow_loss")


def report(study: str, workdir: str) -> dict:
    out = subprocess.run(
        ["harness", "study", "report", study, "--json", "--workdir", workdir],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("studies", nargs="+")
    ap.add_argument("--param", required=True, help="the searched parameter naming the arms")
    ap.add_argument("--baseline", required=True, help="the baseline arm's value")
    ap.add_argument("--workdir", default="work")
    args = ap.parse_args()
    per: dict[str, dict[str, list[float]]] = {}
    for study in args.studies:
        for c in report(study, args.workdir)["configurations"]:
            arm = str(c["params"][args.param])
            for m in METRICS:
                per.setdefault(arm, {}).setdefault(m, []).extend(c["metrics"][m]["per_seed"])
    if args.baseline not in per:
        sys.exit(f"no arm {args.baseline!r}; arms: {', '.join(per)}")
    base = per[args.baseline]
    rows = []
    for arm, values in per.items():
        for m in METRICS:
            row = {"arm": arm, "metric": m, "seeds": len(values[m]),
                   "mean": sum(values[m]) / len(values[m]), "per_seed": values[m]}  # fmt: skip
            if arm != args.baseline:
                t = paired_t(values[m], base[m])
                resolved = t.low > 0 or t.high < 0
                row |= {"effect": t.estimate, "ci": [t.low, t.high], "p": t.p_value,
                        "verdict": "resolved" if resolved else "not resolved"}  # fmt: skip
            rows.append(row)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
