from trainers.preference.train import run

raise SystemExit(run())
