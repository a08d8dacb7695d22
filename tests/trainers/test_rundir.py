"""The run directory survives kills: torn lines are tolerated and repaired, a resumed attempt
never writes a metric or sample record twice, torn JSON files read as absent."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from trainers.rundir import RunDir, read_jsonl, repair_jsonl_tail


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def keys(run: RunDir) -> Counter:
    return Counter((r["step"], r["name"]) for r in run.read_metrics())


def test_a_torn_last_line_is_tolerated_and_cut_before_the_next_append(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    run.log_metrics(1, {"loss": 1.0})
    with open(run.metrics, "a") as f:  # a kill in the middle of an append
        f.write('{"step": 2, "name": "lo')
    assert [r["step"] for r in run.read_metrics()] == [1]  # tolerated
    run.log_metrics(2, {"loss": 0.5})
    # Repaired: every line parses, the new record is on a line of its own.
    assert [json.loads(line)["step"] for line in lines(run.metrics)] == [1, 2]
    # A fresh RunDir object (a new process) repairs too.
    with open(run.metrics, "a") as f:
        f.write('{"step": 3, "na')
    RunDir(run.root).log_metrics(3, {"loss": 0.25})
    assert [json.loads(line)["step"] for line in lines(run.metrics)] == [1, 2, 3]


def test_repair_keeps_a_complete_record_that_only_lacks_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}')
    repair_jsonl_tail(path)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"st')  # the only line is torn
    repair_jsonl_tail(path)
    assert path.read_text() == ""
    repair_jsonl_tail(tmp_path / "missing.jsonl")  # nothing to repair


def test_a_torn_manifest_line_is_repaired_on_append(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.append_manifest([{"path": "a.png", "step": 1}])
    with open(run.manifest, "a") as f:
        f.write('{"path": "b.p')
    run.append_manifest([{"path": "b.png", "step": 2}])
    assert [r["path"] for r in read_jsonl(run.manifest)] == ["a.png", "b.png"]
    assert all(json.loads(line) for line in lines(run.manifest))


def test_resume_drops_records_after_the_checkpoint_and_never_duplicates(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    for step in range(1, 11):  # the killed attempt: checkpoint at 5, records up to 10
        run.log_metrics(step, {"loss": 1.0 / step, "lr": 0.1})
    run.append_manifest([{"path": "samples/s8.png", "step": 8}])
    with open(run.metrics, "a") as f:
        f.write('{"step": 11, "na')  # and a torn line
    inode = run.metrics.stat().st_ino
    resumed = RunDir(run.root)  # the resumed attempt's process
    resumed.truncate_after(5)
    assert max(r["step"] for r in resumed.read_metrics()) == 5
    assert read_jsonl(run.manifest) == []
    assert run.metrics.stat().st_ino != inode  # rewritten atomically (a new file renamed over)
    for step in range(6, 11):
        resumed.log_metrics(step, {"loss": 2.0 / step, "lr": 0.1})
    counts = keys(resumed)
    assert set(counts.values()) == {1} and len(counts) == 20
    assert all(json.loads(line) for line in lines(run.metrics))
    # Resumed at the last step, the final evaluation runs again: replaced, not appended.
    resumed.log_metrics(10, {"domain_fid": 3.0})
    again = RunDir(run.root)
    again.log_metrics(10, {"domain_fid": 2.5})
    final = [r for r in again.read_metrics() if r["name"] == "domain_fid"]
    assert [r["value"] for r in final] == [2.5]
    assert set(keys(again).values()) == {1}
    again.append_manifest([{"path": "samples/final.png", "step": 10, "seed": 0}])
    again.append_manifest([{"path": "samples/final.png", "step": 10, "seed": 1}])
    assert [r["seed"] for r in read_jsonl(run.manifest)] == [1]


def test_truncate_collapses_records_written_twice(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    rec = {"step": 0, "name": "pairs/n", "value": 1.0, "time": 0.0}
    run.metrics.write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "value": 2.0}) + "\n")
    run.truncate_after(0)
    assert [r["value"] for r in run.read_metrics()] == [2.0]


def test_torn_json_files_read_as_absent(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    run.status.write_text('{"status": "o')
    run.config.write_text("")
    assert run.read_status() is None and run.read_config() is None
    run.write_status("ok", 3)
    run.write_config({"seed": 0}, "abc")
    assert run.read_status()["status"] == "ok" and run.read_config()["config_hash"] == "abc"
