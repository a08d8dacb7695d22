"""``python -m trainers.flow --config C.json --run-dir DIR``: the flow-matching trainer process
(``trainers/train.py``). A module of its own, so that the flow maths (``trainers/flow/__init__.py``)
that the trainer imports imports nothing above it."""

from trainers.train import main

if __name__ == "__main__":  # pragma: no cover - thin entry point, tested through subprocesses
    raise SystemExit(main())
