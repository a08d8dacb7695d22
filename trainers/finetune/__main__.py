from trainers.finetune.train import run

raise SystemExit(run())
