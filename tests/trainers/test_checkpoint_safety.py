"""A checkpoint is loaded safely: a crafted pickle cannot run code, a truncated or garbage file
is refused with a message naming it and the fix, and a finished run relaunched on a corrupt
checkpoint keeps its "ok" status."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch

from tests.trainers.trainer_utils import config, write_config
from trainers.errors import DataError
from trainers.rundir import RunDir


class _RunsCode:
    """Unpickling this object writes a marker file: a stand-in for ``os.system(...)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    marker = tmp_path / "marker"
    torch.save({"step": 3, "net": _RunsCode(marker)}, run.checkpoint)
    with pytest.raises(DataError) as info:
        run.load_checkpoint()
    message = str(info.value)
    assert str(run.checkpoint) in message and "unsafe" in message and "delete" in message
    assert not marker.exists()
    # The file really is a weapon: the old weights_only=False load would have run it.
    torch.load(run.checkpoint, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a dict"])
def test_a_damaged_checkpoint_names_the_file_and_the_fix(tmp_path: Path, damage: str) -> None:
    run = RunDir(tmp_path / "run")
    run.create()
    run.save_checkpoint({"step": 3, "net": {"w": torch.randn(64, 64)}})
    if damage == "truncated":
        data = run.checkpoint.read_bytes()
        run.checkpoint.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        run.checkpoint.write_bytes(b"\x00garbage" * 100)
    else:
        torch.save([1, 2, 3], run.checkpoint)
    with pytest.raises(DataError) as info:
        run.load_checkpoint()
    assert str(run.checkpoint) in str(info.value)
    assert "delete" in str(info.value) and "from scratch" in str(info.value)


def test_a_trainer_checkpoint_round_trips_under_weights_only(tmp_path: Path) -> None:
    """What the trainer saves (state dicts of module, optimizer, scheduler; the RNG state)
    loads under weights_only=True."""
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched.step()
    run = RunDir(tmp_path / "run")
    state = {
        "step": 1,
        "config_hash": "abc",
        "net": net.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "shift": 3.0,
        "torch_rng": torch.get_rng_state(),
    }
    run.save_checkpoint(state)
    loaded = run.load_checkpoint()
    assert loaded is not None and loaded["step"] == 1
    assert torch.equal(loaded["torch_rng"], state["torch_rng"])
    opt.load_state_dict(loaded["optimizer"])
    sched.load_state_dict(loaded["scheduler"])


def test_a_finished_run_relaunched_on_a_corrupt_checkpoint_keeps_its_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m trainers.flow` relaunched on a finished run whose checkpoint broke: exit 2
    with the file and the fix on stderr, status.json ("ok") left byte for byte."""
    import signal

    from trainers.train import EXIT_BAD_INPUT, main

    monkeypatch.setenv("HARNESS_CAPTURED", "1")  # no tee of stdout/stderr into the run dir
    cfg_path = write_config(tmp_path / "cfg.json", config(train={"steps": 2}))
    run = RunDir(tmp_path / "run")
    run.create()
    run.write_status("ok", 2, metrics={"domain_fid": 1.0})
    before = run.status.read_bytes()
    run.checkpoint.write_bytes(b"PK\x03\x04 truncated zip")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = main(["--config", str(cfg_path), "--run-dir", str(run.root), "--device", "cpu"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    assert str(run.checkpoint) in err and "delete" in err
    assert "Traceback" not in err
    assert run.status.read_bytes() == before
    assert json.loads(before)["status"] == "ok"
