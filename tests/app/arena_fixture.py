"""A small but complete arena work directory for the app's tests, built in about a second.

One study (``toy``: 3 trials, complete / complete / failed) with its Optuna SQLite study,
DuckDB rows (inserted directly) and run directories (metrics.jsonl, tiny PNG samples at two
steps and final);
three contestants from its runs, rendered on 4 prompts x 1 seed in two categories; the gold
noise contestant; a few domain-judge votes; one human rater with a token. Images are drawn
with PIL (a coloured disc on a background; the "bad" contestant draws it off-colour), 24 px.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from harness.raters import add_rater
from harness.store import Store
from harness.voting import add_gold_noise

PX = 24
PROMPTS = [
    (0, "a red circle", "seen", (220, 30, 30)),
    (1, "a blue circle", "seen", (30, 30, 220)),
    (2, "a green circle", "heldout", (30, 180, 30)),
    (3, "a yellow circle", "heldout", (230, 210, 20)),
]
CONTESTANTS = {"c-good": 0, "c-mid": 1, "c-bad": 2}  # contestant -> trial whose run it is


@dataclass(frozen=True)
class Arena:
    workdir: Path
    store: Store
    rater_id: str
    token: str


def _png(path: Path, colour: tuple[int, int, int], radius: int, background: int = 245) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (PX, PX), (background,) * 3)
    c = PX // 2
    ImageDraw.Draw(im).ellipse((c - radius, c - radius, c + radius, c + radius), fill=colour)
    im.save(path)


def _run_dir(root: Path, trial: int, failed: bool) -> tuple[Path, dict]:
    run = root / "runs" / "toy" / f"{trial:04d}"
    config = {"seed": trial, "timesteps": {"sampler": ["uniform", "logit_normal", "mode"][trial]}}
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps({**config, "config_hash": f"hash{trial}"}))
    lines = []
    for step in (10, 20, 30, 40):
        loss = 1.0 / (step * (trial + 1)) + 0.1
        lines.append({"step": step, "name": "train/loss", "value": loss, "time": 1.7e9 + step})
    for step in (20, 40):
        lines.append(
            {
                "step": step,
                "name": "domain_fid",
                "value": 50.0 - step + 5 * trial,
                "time": 1.7e9 + step,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    manifest = []
    for tag, step in (("step_000020", 20), ("step_000040", 40), ("final", 40)):
        for pid, prompt, _, colour in PROMPTS[:2]:
            rel = f"{tag}/p{pid}_s0.png"
            _png(run / "samples" / rel, colour, 3 + step // 10)
            manifest.append(
                {
                    "path": rel,
                    "tag": tag,
                    "step": step,
                    "prompt_id": pid,
                    "prompt": prompt,
                    "seed": 0,
                    "nfe": 8,
                    "cfg": 3.0,
                }
            )
    (run / "samples" / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in manifest))
    status = (
        {"status": "failed", "step": 30, "reason": "loss is NaN at step 30"}
        if failed
        else {"status": "ok", "step": 40, "reason": ""}
    )
    (run / "status.json").write_text(json.dumps(status))
    return run, config


def _fill_run(store: Store, run_id: str, run: Path) -> None:
    """The run's metrics and samples rows, inserted directly: Store.ingest_run_dir would import
    trainers.rundir and with it torch (seconds), which nothing here needs."""
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (run / "samples/manifest.jsonl").read_text().splitlines()]
    with store.transaction() as con:
        con.executemany(
            "INSERT INTO metrics VALUES (?, ?, ?, ?, ?)",
            [(run_id, m["step"], m["name"], m["value"], m["time"]) for m in metrics],
        )
        con.executemany(
            "INSERT INTO samples (run_id, path, tag, step, prompt_id, prompt, seed, nfe, cfg, "
            "sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (run_id, x["path"], x["tag"], x["step"], x["prompt_id"], x["prompt"], x["seed"],
                 x["nfe"], x["cfg"],
                 hashlib.sha256((run / "samples" / x["path"]).read_bytes()).hexdigest())
                for x in samples
            ],
        )  # fmt: skip


def _optuna(root: Path) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="toy", storage=f"sqlite:///{root / 'optuna.db'}", direction="minimize"
    )
    dist = {
        "timesteps.sampler": optuna.distributions.CategoricalDistribution(
            ["uniform", "logit_normal", "mode"]
        ),
        "timesteps.shift": optuna.distributions.FloatDistribution(1.0, 4.0),
    }
    for trial, (sampler, shift, value) in enumerate(
        [("uniform", 1.0, 30.0), ("logit_normal", 3.0, 25.0), ("mode", 2.0, None)]
    ):
        state = (
            optuna.trial.TrialState.COMPLETE if value is not None else optuna.trial.TrialState.FAIL
        )
        study.add_trial(
            optuna.trial.create_trial(
                params={"timesteps.sampler": sampler, "timesteps.shift": shift},
                distributions=dist,
                value=value,
                state=state,
                user_attrs={"run_dir": str(root / f"runs/toy/{trial:04d}")},
            )
        )


def build(root: Path, *, optuna_study: bool = True) -> Arena:
    """Write the work directory under ``root`` and return it with a rater's token."""
    root.mkdir(parents=True, exist_ok=True)
    store = Store(root / "harness.duckdb")
    store.create_study("toy", {"name": "toy"}, ["minimize"], ["domain_fid"])
    for trial in range(3):
        failed = trial == 2
        run, config = _run_dir(root, trial, failed)
        run_id = f"toy/{trial}"
        store.register_run(run_id, run, config, f"hash{trial}", study="toy", trial=trial)
        _fill_run(store, run_id, run)
        store.upsert_trial(
            "toy",
            trial,
            "failed" if failed else "complete",
            run_id=run_id,
            params={"timesteps.sampler": config["timesteps"]["sampler"]},
            values=None if failed else [30.0 - 5 * trial],
            error="loss is NaN at step 30" if failed else None,
            stderr_tail="Traceback ...\nFloatingPointError: NaN" if failed else None,
        )
    renders = []
    for cid, trial in CONTESTANTS.items():
        store.add_contestant(
            cid,
            run_id=f"toy/{trial}",
            label=cid.upper(),
            solver="euler",
            steps=8,
            guidance=3.0,
            shift=1.0,
        )
        for pid, prompt, category, colour in PROMPTS:
            path = root / "arena" / cid / f"p{pid}_s0.png"
            shown = colour if cid != "c-bad" else colour[::-1]
            _png(path, shown, {"c-good": 9, "c-mid": 6, "c-bad": 4}[cid])
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            renders.append((cid, pid, prompt, category, 0, str(path), digest, 1.7e9))
    with store.transaction() as con:
        con.executemany(
            "INSERT INTO renders (contestant_id, prompt_id, prompt, category, seed, "
            "path, sha256, time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            renders,
        )
    add_gold_noise(store, root / "arena" / "gold-noise")
    votes = []
    for k, (left, right, outcome) in enumerate(
        [
            ("c-good", "c-mid", "left"),
            ("c-mid", "c-bad", "left"),
            ("c-bad", "c-good", "right"),
            ("c-good", "c-bad", "left"),
            ("c-mid", "c-good", "tie"),
        ]
    ):
        pid, prompt, _, _ = PROMPTS[k % 4]
        votes.append(
            {
                "prompt": prompt,
                "seed": 0,
                "left_id": left,
                "right_id": right,
                "outcome": outcome,
                "rater_id": "domain",
                "rater_kind": "domain",
                "time": 1.7e9 + k,
            }
        )
    store.add_comparisons(votes)
    if optuna_study:
        _optuna(root)
    rater_id, token = add_rater(store, "Ana Lima")
    return Arena(root, store, rater_id, token)
