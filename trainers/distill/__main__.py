from trainers.distill.train import run

raise SystemExit(run())
