"""The distillation results table: the teacher at several step counts against every student.

    uv run harness study run studies/timestep.yaml     # the teacher (best trial)
    uv run harness study run studies/distill.yaml      # the students
    uv run python bench/distill_table.py --workdir work --arena

The teacher (``base.teacher`` of the distillation study, e.g. ``best:timestep``, resolved the
way the study runner does) is evaluated with the students' evaluator settings (same prompts,
seeds, image count and reference statistics: ``trainers.evaluate.ShapesEvaluator``) at each of
``--teacher-steps`` with guidance ``distill.guidance`` (2 network evaluations per step); each
student's figures are its final evaluation from the store (1 evaluation per step, no guidance).
Training cost is the trial's wall time on this machine (trainer start to end) and, for the
teacher, that of its own trial. ``--arena`` registers the teacher at every step count and every
student as arena contestants (``harness arena render`` / ``harness judge`` then compare them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from harness.arena_pipeline import add_run_contestants
from harness.runner import Workdir, resolve_teacher_ref
from harness.spec import load_study
from harness.store import Store
from harness.workpaths import store_work_root, to_stored
from trainers.config import load_config
from trainers.evaluate import ShapesEvaluator
from trainers.export import load_export


def _trial_cost(store: Store, run_dir: str) -> float | None:
    rows = store.query(
        "SELECT t.started_at, t.ended_at FROM trials t JOIN runs r USING (run_id) "
        "WHERE r.run_dir = ? OR r.run_dir = ?",  # recorded relative to the work dir (or absolute)
        [run_dir, to_stored(run_dir, store_work_root(store))],
    )
    if rows and rows[0]["started_at"] and rows[0]["ended_at"]:
        return float(rows[0]["ended_at"] - rows[0]["started_at"])
    return None


def _final(store: Store, run_id: str, name: str) -> float | None:
    rows = store.metrics(run_id, name)
    return float(rows[-1]["value"]) if rows else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("work"))
    ap.add_argument("--study", type=Path, default=Path("studies/distill.yaml"))
    ap.add_argument("--teacher-steps", default="1,2,4,8,25")
    ap.add_argument("--arena", action="store_true", help="also register arena contestants")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    store = Store(Workdir(args.workdir).store)
    spec = resolve_teacher_ref(load_study(args.study), store)
    teacher_dir = Path(spec.base["teacher"])
    guidance = float(spec.base.get("distill", {}).get("guidance", 1.5))
    students = store.query(
        "SELECT t.number, t.params, t.run_id, r.run_dir, t.started_at, t.ended_at "
        "FROM trials t JOIN runs r USING (run_id) WHERE t.study = ? AND t.state = 'complete' "
        "ORDER BY t.number",
        [spec.name],
    )
    if not students:
        raise SystemExit(f"no complete trial of study {spec.name!r} in {store.path}")

    # The teacher, evaluated as the students are.
    student_dir = store.run_dir_path(students[0]["run_dir"])  # relative to the work dir
    student_cfg = json.loads((student_dir / "config.json").read_text())
    teacher_cfg = load_config(teacher_dir / "config.json")
    eval_cfg = teacher_cfg.eval.model_copy(
        update={k: student_cfg["eval"][k] for k in ("num_images", "reference_images")}
    )
    teacher_cfg = teacher_cfg.model_copy(update={"eval": eval_cfg})
    model = load_export(teacher_dir / "final")
    evaluator = ShapesEvaluator(teacher_cfg, torch.device("cpu"))
    teacher_cost = _trial_cost(store, str(teacher_dir))
    rows: list[dict[str, Any]] = []
    for n in [int(s) for s in args.teacher_steps.split(",")]:
        values = evaluator.run(
            lambda p, s, n=n: model.generate(p, s, steps=n, guidance=guidance, solver="euler")
        )
        rows.append(
            {
                "model": f"teacher ({teacher_dir.name}, cfg {guidance:g})",
                "steps": n,
                "nfe": 2 * n,
                **{
                    k: values.get(k)
                    for k in ("domain_fid", "attr_acc_mean", "heldout_attr_acc_mean")
                },
                "cost_s": teacher_cost,
            }
        )
        print(f"teacher at {n} steps: {values['domain_fid']:.1f}", flush=True)
    for s in students:
        params = json.loads(s["params"]) if isinstance(s["params"], str) else s["params"]
        rows.append(
            {
                "model": params["distill.method"],
                "steps": params["distill.steps"],
                "nfe": params["distill.steps"],
                "domain_fid": _final(store, s["run_id"], "domain_fid"),
                "attr_acc_mean": _final(store, s["run_id"], "attr_acc_mean"),
                "heldout_attr_acc_mean": _final(store, s["run_id"], "heldout_attr_acc_mean"),
                "cost_s": (s["ended_at"] - s["started_at"]) if s["ended_at"] else None,
            }
        )

    def fmt(v: Any, spec_: str) -> str:
        return "-" if v is None else format(v, spec_)

    lines = [
        "| model | steps | NFE | domain FID | attr_acc_mean | heldout acc | training (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(
        rows, key=lambda r: (r["model"].startswith("teacher") is False, r["model"], r["steps"])
    ):
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['nfe']} | {fmt(r['domain_fid'], '.1f')} | "
            f"{fmt(r['attr_acc_mean'], '.3f')} | {fmt(r['heldout_attr_acc_mean'], '.3f')} | "
            f"{fmt(r['cost_s'], '.0f')} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")

    if args.arena:
        teacher_run = store.query(
            "SELECT run_id FROM runs WHERE run_dir = ? OR run_dir = ?",
            [str(teacher_dir), to_stored(teacher_dir, store_work_root(store))],
        )
        added = add_run_contestants(
            store,
            [teacher_run[0]["run_id"]],
            steps=[int(x) for x in args.teacher_steps.split(",")],
            guidance=guidance,
            label="teacher",
        )
        for s in students:
            params = json.loads(s["params"]) if isinstance(s["params"], str) else s["params"]
            added += add_run_contestants(
                store,
                [s["run_id"]],
                steps=[params["distill.steps"]],
                label=f"{params['distill.method']}-{params['distill.steps']}",
            )
        print(f"arena: {sum(a.created for a in added)} new contestants, {len(added)} in all")


if __name__ == "__main__":
    main()
