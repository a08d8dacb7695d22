"""Helpers of ``bench/gpu_check.sh`` (the one-call check on a lent GPU): configs, a throughput
wrapper that also times compilation and counts recompiles, evidence that two study trials trained
side by side, run summaries, and the final report (``gpu_check.json`` and ``gpu_check.md``).

Every subcommand is called by the shell script; none is meant to be run by hand, except
``report`` to rebuild the report from a kept work directory::

    python bench/gpu_check.py report --work /tmp/gpu_check.XXXX --out gpu_check_out

Only ``env``, ``warm-cache`` and ``throughput`` import torch; the rest are quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sqlite3
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STUDY_NAME = "gpu-check"
TAIL_CHARS = 3000

# Dense bf16 peak TFLOP/s by device name (datasheet, without sparsity), for MFU.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0))

PACKAGES = [
    "torch",
    "triton",
    "diffusers",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "tokenizers",
    "pydantic",
    "pydantic-core",
    "typing-extensions",
    "optuna",
    "sqlalchemy",
    "alembic",
    "duckdb",
    "plotly",
    "narwhals",
    "numpy",
    "scipy",
    "pillow",
    "pyyaml",
    "typer",
    "click",
    "rich",
    "markdown",
    "torchmetrics",
    "pytest",
    "pytest-xdist",
    "pytest-timeout",
]
IMPORTS = [
    "diffusers",
    "pydantic",
    "optuna",
    "duckdb",
    "plotly.graph_objects",
    "yaml",
    "typer",
    "rich",
    "markdown",
    "trainers.train",
    "trainers.distill.train",
    "trainers.repa",
    "harness.runner",
    "harness.cli",
    "harness.report_html",
]


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, chars: int = TAIL_CHARS) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line
    return out


# ----------------------------------------------------------------------------------------------
# env: what the machine has, and whether everything the checks import imports


def cmd_env(args: argparse.Namespace) -> int:
    import importlib
    import importlib.metadata as md
    import platform
    import shutil
    import subprocess

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "pythonpath": os.environ.get("PYTHONPATH", ""),
    }
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info["versions"] = versions
    imports: dict[str, str] = {}
    for mod in IMPORTS:
        try:
            m = importlib.import_module(mod)
            imports[mod] = "ok " + str(getattr(m, "__file__", ""))
        except Exception as err:  # a missing or mismatched package: record it, go on
            imports[mod] = f"FAILED {type(err).__name__}: {err}"
    info["imports"] = imports
    import torch

    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "runtime": torch.version.cuda,
            "device_count": torch.cuda.device_count(),
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_GiB": round(p.total_memory / 2**30, 1),
            "multiprocessors": p.multi_processor_count,
        }
    if shutil.which("nvidia-smi"):
        q = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit"
        res = subprocess.run(
            ["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = (res.stdout or res.stderr).strip()
    _write_json(args.out, info)
    print(json.dumps(info, indent=2))
    failed = [m for m, r in imports.items() if r.startswith("FAILED")]
    if args.require_cuda and not info["cuda_available"]:
        print("CUDA is not available", file=sys.stderr)
        return 1
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# warm-cache: train the cached CPU networks once, so that trainers running in parallel wait on
# the cache's file lock for one training instead of each paying for it


def cmd_warm_cache(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if args.what == "attribute-net":
        from trainers.domain import load_attribute_net

        load_attribute_net()
    else:
        from trainers.repa_encoder import load_patch_encoder

        load_patch_encoder()
    print(f"{args.what}: ready in {time.perf_counter() - t0:.1f} s (cache {args.work})")
    return 0


# ----------------------------------------------------------------------------------------------
# throughput: bench/train_throughput.py as it is, plus per-step times of its warm-up steps
# (the first one holds torch.compile's compilation) and a count of dynamo recompiles


class _RecompileCounter(logging.Handler):
    """Counts dynamo's "Recompiling function" lines (logged for every guard failure, also when
    the recompile limit then refuses to compile) and "hit config.recompile_limit" warnings."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()
        self.limit_hits: set[int] = set()
        self.first_reason = ""

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Recompiling function" in msg:
            self.seen.add(id(record))
            # "triggered by the following guard failure(s): - 0/0: captions[0] == '...'"
            self.first_reason = self.first_reason or " ".join(msg.split())[:600]
        elif "recompile_limit" in msg or "cache_size_limit" in msg:
            self.limit_hits.add(id(record))


def _peak_tflops(name: str) -> float:
    return next((peak for key, peak in PEAK_TFLOPS if key in name), 989.0)


def cmd_throughput(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    import train_throughput

    from trainers.train import FlowTrainer

    bench_args = [a for a in args.bench_args if a != "--"]
    cuda = "cuda" in bench_args
    if cuda and "--peak-tflops" not in bench_args:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        bench_args += ["--peak-tflops", str(_peak_tflops(name))]
    warmup = int(bench_args[bench_args.index("--warmup") + 1]) if "--warmup" in bench_args else 5
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)

    if args.compile_backend != "inductor":  # smoke mode: dynamo without code generation
        compile_ = torch.compile

        def compile_with_backend(*a: Any, **kw: Any) -> Any:
            kw.setdefault("backend", args.compile_backend)
            return compile_(*a, **kw)

        torch.compile = compile_with_backend  # type: ignore[assignment]
    if args.recompile_limit is not None:
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, args.recompile_limit)
    counter = _RecompileCounter()
    if "--compile" in bench_args:
        torch._logging.set_logs(recompiles=True)
        for name in ("torch", "torch._dynamo"):
            logging.getLogger(name).addHandler(counter)

    if args.compile_target == "denoiser":
        # The backbone alone, in place (parameter names unchanged), whatever train.compile does:
        # compiling FlowNet, whose forward tokenizes the captions, recompiled at every step.
        def wrap(self: FlowTrainer, net: torch.nn.Module) -> torch.nn.Module:
            assert self.dist.world == 1
            net.denoiser.compile(backend=args.compile_backend)
            return net

        FlowTrainer._wrap = wrap  # type: ignore[method-assign]
        bench_args = [a for a in bench_args if a != "--compile"]
        bench_args_cfg_compile = True
    else:
        bench_args_cfg_compile = "--compile" in bench_args

    step_s: list[float] = []
    train_step = FlowTrainer.train_step

    def timed_step(self: FlowTrainer) -> tuple[float, float]:
        if len(step_s) > warmup:  # the timed steps: untouched
            return train_step(self)
        sync()
        t = time.perf_counter()
        out = train_step(self)
        sync()
        step_s.append(time.perf_counter() - t)
        return out

    FlowTrainer.train_step = timed_step  # type: ignore[method-assign]
    raw = args.out.with_suffix(".bench.json")
    sys.argv = ["train_throughput.py", *bench_args, "--json", str(raw)]
    result: dict[str, Any] = {"label": args.label, "args": bench_args}
    t0 = time.perf_counter()
    try:
        train_throughput.main()
    except BaseException as err:
        result["error"] = f"{type(err).__name__}: {err}"[:2000]
        _write_json(args.out, result)
        raise
    finally:
        result["wall_s"] = round(time.perf_counter() - t0, 1)
    result |= _read_json(raw) or {}
    warm = step_s[:warmup]
    steady = sorted(warm[1:])[len(warm[1:]) // 2] if len(warm) > 1 else None
    from torch._dynamo.utils import counters

    limit_hits = len(counter.limit_hits) + sum(
        "recompile limit" in k.lower() for k in counters.get("unimplemented", {})
    )
    result |= {
        "compile": bench_args_cfg_compile,
        "compile_target": args.compile_target if bench_args_cfg_compile else None,
        "compile_backend": args.compile_backend if bench_args_cfg_compile else None,
        "first_step_s": round(warm[0], 3) if warm else None,
        "warmup_steps_s": [round(s, 3) for s in warm],
        "flop_count_step_s": round(step_s[warmup], 3) if len(step_s) > warmup else None,
        "compile_s": round(warm[0] - steady, 2) if steady is not None else None,
        "recompiles": len(counter.seen),
        "recompile_limit": args.recompile_limit,
        "recompile_limit_reached": limit_hits > 0,
        "first_recompile": counter.first_reason or None,
        "dynamo_counters": {k: dict(v) for k, v in counters.items() if k in ("frames", "stats")},
    }
    _write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


# ----------------------------------------------------------------------------------------------
# configs of the standalone runs (REPA, the fallback teacher, the student) and the smoke study


def _flow_base(gpu: bool) -> dict[str, Any]:
    return {
        "seed": 0,
        "model": {"backbone": "sd3", "preset": "micro"},
        "data": {"kind": "shapes", "resolution": 16, "size": 2048 if gpu else 256, "seed": 0},
        "text": {"encoder": "vocab", "width": 32, "layers": 1, "cfg_dropout": 0.1},
        "timesteps": {"sampler": "logit_normal"},
        "train": {
            "steps": 40 if gpu else 8,
            "batch_size": 32 if gpu else 8,
            "lr": 1e-3,
            "warmup_steps": 5,
            "log_every": 10 if gpu else 4,
            "checkpoint_every": 20 if gpu else 4,
            "precision": "bf16" if gpu else "auto",
        },
        "eval": {
            "every": 1000,
            "num_images": 16 if gpu else 4,
            "reference_images": 256 if gpu else 64,
            "steps": 4,
            "loss_images": 32 if gpu else 8,
        },
        "sample": {"steps": 4, "num_prompts": 2, "seeds": [0]},
    }


def cmd_configs(args: argparse.Namespace) -> int:
    gpu = args.mode == "gpu"
    args.dir.mkdir(parents=True, exist_ok=True)
    teacher = _flow_base(gpu)
    _write_json(args.dir / "teacher.json", teacher)

    repa = _flow_base(gpu)
    # The tiny preset's 4 blocks, REPA at block 2 with the embedded data's encoder (as
    # studies/repa.yaml, with the vocab text encoder); 32 px on the GPU (an 8x8 token grid).
    repa["model"]["preset"] = "tiny" if gpu else "micro"
    repa["data"]["resolution"] = 32 if gpu else 16
    repa["train"] |= {"batch_size": 64 if gpu else 8}
    repa["repa"] = {
        "weight": 0.5,
        "layer": 2 if gpu else 1,
        "encoder": "shapes-ssl",
        "projector_dim": 256 if gpu else 32,
    }
    _write_json(args.dir / "repa.json", repa)

    if not gpu:  # the same study, a quarter of the work
        study = args.dir / "gpu-check-smoke.yaml"
        study.write_text(
            f"include: {REPO / 'studies' / 'gpu-check.yaml'}\n"
            "base:\n"
            "  train: {steps: 60, batch_size: 8, warmup_steps: 2, log_every: 10,\n"
            "          checkpoint_every: 30}\n"
            "  eval: {num_images: 4, reference_images: 64, loss_images: 8}\n"
        )
    return 0


def cmd_distill_config(args: argparse.Namespace) -> int:
    gpu = args.mode == "gpu"
    method = args.method
    cfg = {
        "seed": 0,
        "teacher": str(args.teacher),
        "distill": {
            "method": method,
            "steps": 2,
            "guidance": 1.5,
            "progressive": {"teacher_steps": 8},
            "consistency": {"grid": 16, "skip": 2},
            "reflow": {"pairs": 64 if gpu else 16, "pair_steps": 4, "distill_fraction": 0.5},
            "dmd": {"pairs": 32 if gpu else 8, "pair_steps": 4, "fake_updates": 1},
        },
        "train": {
            "steps": 40 if gpu else 6,
            "batch_size": 32 if gpu else 4,
            "lr": 1e-4,
            "warmup_steps": 0,
            "log_every": 10 if gpu else 3,
            "checkpoint_every": 20 if gpu else 3,
            "precision": "bf16" if gpu else "auto",
        },
        "eval": {
            "every": 1000,
            "num_images": 16 if gpu else 4,
            "reference_images": 256 if gpu else 64,
            "loss_images": 0,
        },
        "sample": {"num_prompts": 2, "seeds": [0]},
    }
    _write_json(args.out, cfg)
    return 0


# ----------------------------------------------------------------------------------------------
# reap: end the processes a timed-out step left (trainers run in their own sessions, so
# `timeout` does not reach them): every process whose command line names this run's work
# directory, by pid, never this process or its parents


def cmd_reap(args: argparse.Namespace) -> int:
    keep = {os.getpid()}
    pid = os.getpid()
    while pid > 1:  # this process and its ancestors
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        keep.add(pid)
    victims = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in keep:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if args.pattern in cmdline:
            victims.append((int(entry.name), cmdline[:200]))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p, cmd in victims:
            try:
                os.kill(p, sig)
                alive.append((p, cmd))
            except ProcessLookupError:
                continue
        if not alive:
            break
        if sig == signal.SIGTERM:
            print("reaped: " + "; ".join(f"{p} {c}" for p, c in alive), file=sys.stderr)
            time.sleep(3)
        victims = alive
    return 0


# ----------------------------------------------------------------------------------------------
# report


def _steps(work: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    path = work / "steps.tsv"
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 6:
            continue
        name, status, rc, elapsed, limit, started = parts[:6]
        rec: dict[str, Any] = {
            "status": status,
            "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
            "elapsed_s": float(elapsed),
            "timeout_s": int(limit),
            "started_at_s": float(started),
        }
        log = work / "logs" / f"{name}.log"
        if status != "ok":
            rec["log_tail"] = _tail(log)
        out[name] = rec
    return out


def _junit(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"error": f"unreadable junit xml: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    cases = []
    for case in root.iter("testcase"):
        state = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                state = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (child.get("message") or child.text or "")[:1500]
                break
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "state": state,
                "seconds": float(case.get("time") or 0),
                **({"message": message} if message else {}),
            }
        )
    counts = {s: sum(c["state"] == s for c in cases) for s in ("passed", "failed", "error")}
    counts["skipped"] = sum(c["state"] == "skipped" for c in cases)
    return {
        "tests": len(cases),
        **counts,
        "seconds": sum(float(s.get("time") or 0) for s in suites),
        "cases": cases,
    }


def _device_line(run_dir: Path) -> str | None:
    text = _tail(run_dir / "stdout.log", 200_000)
    m = re.search(r"device (\S+?),", text)
    return m.group(1) if m else None


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Status, device and step time of one trainer run directory."""
    if not run_dir.exists():
        return {"status": "missing", "run_dir": str(run_dir)}
    st = _read_json(run_dir / "status.json") or {}
    cfg = _read_json(run_dir / "config.json") or {}
    train = cfg.get("train", {})
    metrics = _jsonl(run_dir / "metrics.jsonl")
    ips = [m["value"] for m in metrics if m["name"] == "train/images_per_s" and m["value"]]
    batch = train.get("batch_size")
    # The first window holds start-up (and compilation): the median of the rest.
    later = ips[1:] or ips
    step_ms = round(1000 * batch / statistics.median(later), 2) if later and batch else None
    final = {
        k: v
        for k, v in (st.get("metrics") or {}).items()
        if k in ("domain_fid", "attr_acc_mean", "eval/flow_loss", "eval/nfe")
    }
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "status": st.get("status", "no status.json"),
        "reason": st.get("reason", ""),
        "step": st.get("step"),
        "steps": train.get("steps"),
        "batch_size": batch,
        "precision": train.get("precision"),
        "device": _device_line(run_dir),
        "step_ms_median": step_ms,
        "images_per_s_median": round(statistics.median(later), 1) if later else None,
        "final_metrics": final,
        "exported": (run_dir / "final").is_dir(),
    }
    repa = [m["value"] for m in metrics if m["name"] == "train/repa_loss"]
    if repa:
        out["repa_loss_first_last"] = [round(repa[0], 4), round(repa[-1], 4)]
    if cfg.get("distill"):
        out["method"] = cfg["distill"].get("method")
        out["student_steps"] = cfg["distill"].get("steps")
        out["teacher"] = cfg.get("teacher")
    if out["status"] != "ok":
        out["stderr_tail"] = _tail(run_dir / "stderr.log")
    return out


def _overlap(intervals: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Seconds during which at least two intervals ran at once, and the most at once."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    running = most = 0
    both = 0.0
    last = None
    for t, d in events:
        if last is not None and running >= 2:
            both += t - last
        running += d
        most = max(most, running)
        last = t
    return {"max_concurrent": most, "seconds_with_two_or_more": round(both, 1)}


def study_evidence(work: Path, study_log: Path, smi_log: Path) -> dict[str, Any]:
    root = work / "study"
    seeds = []
    for run_dir in sorted((root / "runs" / STUDY_NAME).glob("*/s*")):
        runner = run_dir / "runner.json"
        st = _read_json(run_dir / "status.json") or {}
        metrics = _jsonl(run_dir / "metrics.jsonl")
        train_t = [m["time"] for m in metrics if m["name"] == "train/loss"]
        if train_t:  # the first log line ends a window of `step` steps: training began earlier
            first = next(m for m in metrics if m["name"] == "train/images_per_s")
            batch = (_read_json(run_dir / "config.json") or {}).get("train", {}).get("batch_size")
            if batch and first["value"]:
                train_t[0] -= first["step"] * batch / first["value"]
        start = runner.stat().st_mtime if runner.exists() else None
        seeds.append(
            {
                "run": str(run_dir.relative_to(root)),
                "status": st.get("status", "no status.json"),
                "device": _device_line(run_dir),
                "process_start": start,
                "process_end": st.get("time"),
                "train_start": train_t[0] if train_t else None,
                "train_end": train_t[-1] if train_t else None,
                "summary": run_summary(run_dir),
            }
        )
    procs = [(s["process_start"], s["process_end"]) for s in seeds]
    training = [(s["train_start"], s["train_end"]) for s in seeds]
    out: dict[str, Any] = {
        "seed_runs": seeds,
        "processes": _overlap([p for p in procs if None not in p]),
        "training_windows": _overlap([p for p in training if None not in p]),
    }
    t0 = min((p[0] for p in procs if p[0]), default=None)
    for s in seeds:  # times relative to the first trainer's start
        for k in ("process_start", "process_end", "train_start", "train_end"):
            if s[k] is not None and t0 is not None:
                s[k] = round(s[k] - t0, 1)
    db = root / "optuna.db"
    if db.exists():
        try:
            con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            rows = con.execute(
                "SELECT t.number, t.state, t.datetime_start, t.datetime_complete FROM trials t "
                "JOIN studies s ON s.study_id = t.study_id WHERE s.study_name = ? "
                "ORDER BY t.number",
                (STUDY_NAME,),
            ).fetchall()
            con.close()
            out["optuna_trials"] = [
                {"number": n, "state": s, "start": a, "complete": b} for n, s, a, b in rows
            ]

            def ts(v: str) -> float:
                return datetime.fromisoformat(v).timestamp()

            spans = [(ts(a), ts(b)) for _, _, a, b in rows if a and b]
            out["optuna_overlap"] = _overlap(spans)
        except sqlite3.Error as err:
            out["optuna_trials"] = f"unreadable: {err}"
    log = _tail(study_log, 200_000)
    out["runner_log_starts"] = re.findall(r"trial \d+ seed \d+ \(s\d+\) started on [^\n]+", log)
    samples = []
    for line in _tail(smi_log, 500_000).splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            samples.append(int(parts[1]))
    if samples:
        out["nvidia_smi"] = {
            "samples": len(samples),
            "max_compute_processes": max(samples),
            "samples_with_two_or_more": sum(n >= 2 for n in samples),
        }
    ok = [s for s in seeds if s["status"] == "ok"]
    same = {s["device"] for s in ok}
    # Side by side: both finished, on one device, their processes and training steps overlapped.
    out["concurrent"] = bool(
        len(ok) >= 2
        and len(same) == 1
        and out["processes"]["max_concurrent"] >= 2
        and out["training_windows"]["max_concurrent"] >= 2
    )
    out["device"] = next(iter(same)) if len(same) == 1 else sorted(map(str, same))
    return out


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _throughput(work: Path) -> dict[str, Any]:
    out = {}
    for label in ("eager", "compile", "compile_denoiser"):
        res = _read_json(work / f"tp_{label}.json")
        if res is not None:
            out[label] = res
    eager = out.get("eager", {})
    for label in ("compile", "compile_denoiser"):
        res = out.get(label)
        if not res or "images_per_s" not in res or not eager.get("gflop_per_image"):
            continue
        # FlopCounterMode may not see inside compiled code: also give MFU from eager's count.
        tflops = res["images_per_s"] * eager["gflop_per_image"] / 1e3
        res["achieved_tflops_eager_count"] = round(tflops, 3)
        if res.get("mfu") is not None and res.get("achieved_tflops"):
            peak = res["achieved_tflops"] / res["mfu"]
            res["mfu_eager_count"] = round(tflops / peak, 3)
        if eager.get("images_per_s"):
            res["speedup_vs_eager"] = round(res["images_per_s"] / eager["images_per_s"], 2)
    return out


def cmd_report(args: argparse.Namespace) -> int:
    work: Path = args.work
    meta = _read_json(work / "meta.json") or {}
    steps = _steps(work)
    report: dict[str, Any] = {
        "mode": meta.get("mode"),
        "started": meta.get("started"),
        "wall_s": round(time.time() - meta["t0"], 1) if meta.get("t0") else None,
        "budget_s": meta.get("budget_s"),
        "work": str(work),
        "env": _read_json(work / "env.json"),
        "steps": steps,
    }
    report["tests"] = _junit(work / "junit.xml") or {"note": "no junit xml (step did not finish)"}
    report["tests"]["files"] = meta.get("cuda_tests", [])
    study = study_evidence(work, work / "logs" / "study.log", work / "smi.log")
    study["wall_s"] = steps.get("study", {}).get("elapsed_s")
    study["status"] = steps.get("study", {}).get("status", "not run")
    report["study"] = study
    report["throughput"] = _throughput(work)
    for key in ("repa", "distill"):
        step = steps.get(key, {})
        report[key] = run_summary(work / key) | {
            "step_status": step.get("status", "not run"),
            "wall_s": step.get("elapsed_s"),
        }
    report["distill"]["teacher_source"] = _read_teacher_source(work)
    bad = sorted(n for n, s in steps.items() if s["status"] != "ok")
    report["summary"] = {
        "steps_ok": sum(s["status"] == "ok" for s in steps.values()),
        "steps_not_ok": bad,
        "study_concurrent": study["concurrent"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    _write_json(args.out / "gpu_check.json", report)
    md = render_markdown(report)
    (args.out / "gpu_check.md").write_text(md)
    print(md)
    return 0


def _read_teacher_source(work: Path) -> str | None:
    p = work / "teacher_source.txt"
    return p.read_text().strip() if p.exists() else None


def render_markdown(r: dict[str, Any]) -> str:
    env = r.get("env") or {}
    cuda = env.get("cuda") or {}
    lines = [
        f"# GPU check ({r.get('mode')})",
        "",
        f"Started {r.get('started')}; wall {_fmt(r.get('wall_s'))} s of a {r.get('budget_s')} s "
        f"budget. Device: {cuda.get('name', 'cpu')} ({cuda.get('memory_GiB', '-')} GiB), "
        f"torch {env.get('torch')}, CUDA {cuda.get('runtime', '-')}, "
        f"Python {env.get('python')}, {env.get('cpus')} CPUs.",
        "",
        "## Steps",
        "",
        "| step | status | rc | seconds | time box (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for name, s in r["steps"].items():
        lines.append(
            f"| {name} | {s['status']} | {s['rc']} | {s['elapsed_s']:.1f} | {s['timeout_s']} |"
        )
    failed_imports = {
        k: v for k, v in (env.get("imports") or {}).items() if str(v).startswith("FAILED")
    }
    if failed_imports:
        lines += ["", "Imports that failed:", ""]
        lines += [f"- `{k}`: {v}" for k, v in failed_imports.items()]
    t = r["tests"]
    lines += ["", "## CUDA tests", ""]
    files = ", ".join(f"`{f}`" for f in t.get("files", [])) or "none found"
    if "cases" in t:
        lines.append(
            f"{files}: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
            f"{t['skipped']} skipped in {t['seconds']:.1f} s."
        )
        lines += ["", "| test | state | seconds |", "|---|---|---:|"]
        lines += [f"| `{c['test']}` | {c['state']} | {c['seconds']:.1f} |" for c in t["cases"]]
    else:
        lines.append(f"{files}: {t.get('note') or t.get('error')}")
    s = r["study"]
    lines += [
        "",
        "## Study: two trials on one device",
        "",
        f"Status {s['status']}, wall {_fmt(s.get('wall_s'))} s, device {s.get('device')}. "
        f"Trained side by side: **{'yes' if s['concurrent'] else 'no'}** (training windows: "
        f"max {s['training_windows']['max_concurrent']} at once, "
        f"{s['training_windows']['seconds_with_two_or_more']} s with two; trainer processes: "
        f"max {s['processes']['max_concurrent']}, "
        f"{s['processes']['seconds_with_two_or_more']} s with two).",
        "",
        "Seconds from the first trainer's start:",
        "",
        "| seed run | status | device | process start | training start | training end | "
        "process end | ms/step |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in s["seed_runs"]:
        lines.append(
            f"| {run['run']} | {run['status']} | {run['device']} | {_fmt(run['process_start'])} | "
            f"{_fmt(run['train_start'])} | {_fmt(run['train_end'])} | "
            f"{_fmt(run['process_end'])} | {_fmt(run['summary'].get('step_ms_median'), 2)} |"
        )
    if s.get("nvidia_smi"):
        n = s["nvidia_smi"]
        lines.append(
            f"\nnvidia-smi: at most {n['max_compute_processes']} compute processes at once; "
            f"{n['samples_with_two_or_more']} of {n['samples']} one-second samples had two or "
            "more."
        )
    if s.get("runner_log_starts"):
        lines.append("\nRunner: " + "; ".join(s["runner_log_starts"]))
    lines += [
        "",
        "## Throughput",
        "",
        "| run | images/s | ms/step | TFLOP/s | MFU | MFU (eager FLOP count) | first step (s) | "
        "compile (s) | guard failures | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, res in r["throughput"].items():
        if "images_per_s" not in res:
            lines.append(f"| {label} | failed: {res.get('error', '?')[:120]} | | | | | | | | |")
            continue
        lines.append(
            f"| {label} | {_fmt(res['images_per_s'])} | {_fmt(res['step_ms'])} | "
            f"{_fmt(res['achieved_tflops'], 2)} | {_fmt(res.get('mfu'), 3)} | "
            f"{_fmt(res.get('mfu_eager_count'), 3)} | {_fmt(res.get('first_step_s'), 2)} | "
            f"{_fmt(res.get('compile_s'), 1)} | {res.get('recompiles')} | "
            f"{_fmt(res.get('peak_mem_GiB'), 2)} |"
        )
    for label, res in r["throughput"].items():
        if res.get("recompile_limit_reached"):
            lines.append(
                f"\n**{label}: dynamo's guards failed {res['recompiles']} times and the recompile "
                f"limit ({res['recompile_limit']}) was reached: later steps ran the uncompiled "
                f"code.** First guard failure: `{(res.get('first_recompile') or '')[:300]}`"
            )
    if r["throughput"]:
        first = next(iter(r["throughput"].values()))
        lines.append(
            f"\n`{first.get('preset')}` ({first.get('params_M')} M parameters), "
            f"{first.get('resolution')} px, patch {first.get('patch_size')}, batch "
            f"{first.get('batch_size')}, {first.get('precision')}; "
            f"GFLOP/image (fwd+bwd) {first.get('gflop_per_image')}."
        )
    for key, title in (("repa", "REPA"), ("distill", "Distillation")):
        x = r[key]
        lines += ["", f"## {title}", ""]
        lines.append(
            f"Step {x['step_status']}; run status {x['status']}"
            f"{' (' + x['reason'] + ')' if x.get('reason') else ''}; device {x.get('device')}; "
            f"step {x.get('step')}/{x.get('steps')}, batch {x.get('batch_size')}, "
            f"{x.get('precision')}; median step {_fmt(x.get('step_ms_median'), 2)} ms "
            f"({_fmt(x.get('images_per_s_median'))} images/s); wall {_fmt(x.get('wall_s'))} s; "
            f"exported {x.get('exported')}."
        )
        if x.get("repa_loss_first_last"):
            lines.append(f"REPA loss first/last: {x['repa_loss_first_last']}.")
        if x.get("method"):
            lines.append(
                f"Method {x['method']}, {x.get('student_steps')} student steps; teacher "
                f"{x.get('teacher_source')}."
            )
        if x.get("final_metrics"):
            lines.append(f"Final: {json.dumps(x['final_metrics'])}.")
    bad = r["summary"]["steps_not_ok"]
    lines += ["", "## Verdict", ""]
    lines.append(
        f"{r['summary']['steps_ok']} steps ok; not ok: {', '.join(bad) if bad else 'none'}."
    )
    for name in bad:
        tail = r["steps"][name].get("log_tail", "")
        lines += ["", f"### {name}: last lines of its log", "", "```", tail[-1500:], "```"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("env", help="versions, devices, and whether the imports work")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--require-cuda", action="store_true")
    s.set_defaults(func=cmd_env)

    s = sub.add_parser("warm-cache", help="train a cached CPU network once")
    s.add_argument("what", choices=["attribute-net", "repa-encoder"])
    s.add_argument("--work", default="", help="the run's work directory (names the process)")
    s.set_defaults(func=cmd_warm_cache)

    s = sub.add_parser("throughput", help="bench/train_throughput.py, timed and counted")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--label", required=True)
    s.add_argument(
        "--compile-target",
        choices=["trainer", "denoiser"],
        default="trainer",
        help="trainer: what train.compile does; denoiser: only the backbone, in place",
    )
    s.add_argument("--compile-backend", default="inductor")
    s.add_argument("--recompile-limit", type=int, default=None)
    s.add_argument("bench_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_throughput)

    s = sub.add_parser("configs", help="write the standalone runs' configs")
    s.add_argument("--mode", choices=["gpu", "smoke"], required=True)
    s.add_argument("--dir", type=Path, required=True)
    s.set_defaults(func=cmd_configs)

    s = sub.add_parser("distill-config", help="write the student's config")
    s.add_argument("--mode", choices=["gpu", "smoke"], required=True)
    s.add_argument("--teacher", type=Path, required=True)
    s.add_argument("--method", default="consistency")
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_distill_config)

    s = sub.add_parser("reap", help="end leftover processes naming the work directory")
    s.add_argument("--pattern", required=True)
    s.set_defaults(func=cmd_reap)

    s = sub.add_parser("report", help="write gpu_check.json and gpu_check.md")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.set_defaults(func=cmd_report)

    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
