"""The post-training seam: every trainer that starts from a finished model.

Distillation (``trainers/distill``) and fine-tuning (``trainers/finetune``: continued training,
SFT, DreamBooth) are the flow trainer (``trainers/train.py``: run directory, resume, SIGTERM,
EMA, evaluation, samples, export) with the model loaded instead of built. What they share is
here, once:

- :func:`resolve_init`: the starting model is a finished run directory (``final/`` plus its
  ``config.json``) or an export directory (``harness.json``; its parent's ``config.json`` when
  there is one, else the config's ``data`` gives the training data);
- :func:`flow_view`: the flow config the post-trained model is trained and evaluated under: the
  starting run's model, text encoder and timesteps; the post-training config's seed, data,
  train, eval and sample settings;
- :class:`PostTrainer`: loads the export as the model (the text encoder frozen: it is not part
  of the trained parameters nor of checkpoints), checks the shift, hashes its own config and
  records where it started in ``final/harness.json``. Subclasses choose what is trained with
  :meth:`~trainers.train.FlowTrainer.trainable_parameters` (decided in :meth:`build_net`:
  parameters that require gradients there) and the loss in ``train_step``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainers.config import ConfigError, DataConfig, FlowConfig, load_config, parse_config
from trainers.errors import WeightsError
from trainers.export import ExportedModel, load_export
from trainers.train import Dist, FlowNet, FlowTrainer, NonFiniteLoss

__all__ = ["InitModel", "PostTrainer", "check_single_process", "flow_view", "resolve_init"]


@dataclass(frozen=True)
class InitModel:
    """A resolved starting model: its export directory and the flow config it was trained with
    (for a distilled or fine-tuned start: the flow config that run trained under)."""

    export: Path
    config: FlowConfig


def resolve_init(source: str, data: DataConfig | None, key: str = "init") -> InitModel:
    """``source`` (the config field ``key``) is a finished run directory (``final/`` +
    ``config.json``) or an export directory (``harness.json``; its parent's ``config.json`` is
    used when there is one, else ``data`` must be given)."""
    root = Path(source).expanduser()
    if (root / "final" / "harness.json").is_file():
        export, run_root = root / "final", root
    elif (root / "harness.json").is_file():
        export, run_root = root, root.parent
    else:
        raise WeightsError(
            f"{key} {source!r} is neither a finished run directory (with "
            "final/harness.json) nor an exported model (with harness.json); train the model "
            "first, e.g. `harness study run studies/timestep.yaml`, and pass its run directory"
        )
    meta = json.loads((export / "harness.json").read_text())
    run_config = run_root / "config.json"
    if run_config.is_file():
        raw = json.loads(run_config.read_text())
        if raw.get("trainer", "flow") != "flow":
            # A distilled or fine-tuned start: the flow config its own run trained under.
            if "flow_config" not in meta:
                raise ConfigError(
                    f"{key} {source!r} is a {raw.get('trainer')!r} run exported before its "
                    "flow config was recorded; start from the flow run it came from"
                )
            flow = parse_config(meta["flow_config"], str(export / "harness.json"))
        else:
            flow = load_config(run_config)
    elif data is not None:
        flow = parse_config(
            {
                "model": {"backbone": meta["backbone"]},
                "text": {"encoder": meta.get("text_encoder", "vocab")},
                "timesteps": meta.get("timesteps", {}),
                "data": data.model_dump(),
            }
        )
    else:
        raise ConfigError(
            f"{key} {source!r} has no config.json next to its export, so its training "
            "data is unknown; give `data:` in the config"
        )
    if not isinstance(flow, FlowConfig):
        raise ConfigError(f"{key} {source!r} was not trained by the flow trainer")
    return InitModel(export, flow)


def flow_view(
    init: InitModel,
    *,
    seed: int,
    train: Any,
    eval: Any,
    sample: Any,
    data: DataConfig | None,
    cfg_dropout: float | None = None,
) -> FlowConfig:
    """The flow config a post-trained model is trained and evaluated under: ``init``'s model,
    text encoder and timesteps (REPA off); these seed, train, eval and sample settings (pydantic
    models or dicts), and ``data`` when given (else ``init``'s); ``cfg_dropout`` replaces the
    caption dropout when given."""
    out = init.config.model_dump(mode="json")

    def plain(x: Any) -> Any:
        return x.model_dump(mode="json") if hasattr(x, "model_dump") else dict(x)

    out.update(seed=seed, train=plain(train), eval=plain(eval), sample=plain(sample))
    out.pop("repa", None)
    if cfg_dropout is not None:
        out["text"]["cfg_dropout"] = cfg_dropout
    if data is not None:
        out["data"] = data.model_dump(mode="json")
    return parse_config(out, "<post-training view>")


class PostTrainer(FlowTrainer):
    """A flow trainer whose model is a finished export (see the module docstring).

    Subclasses set ``self.pcfg`` (their own config, with a ``hash()``) and ``self.init`` before
    calling ``super().__init__(flow_view(...), run, dist_)``.
    """

    pcfg: Any
    init: InitModel
    _window: dict[str, list[float]]
    drift_metrics: tuple[str, ...] = ("domain_fid", "attr_acc_mean", "attr_all_correct")
    """Evaluation metrics whose change from the starting model (step 0) is logged as
    ``prior_drift/<name>`` at every later evaluation."""

    def evaluate_start(self) -> bool:
        """Whether :meth:`fit` evaluates the starting model before the first step (the "before"
        of every drift and gain); off unless a subclass says."""
        return False

    def fit(self) -> None:
        if self.step == 0 and self.evaluate_start() and not self.start_evaluated():
            self.evaluate()
        super().fit()

    def start_evaluated(self) -> bool:
        """Whether the starting model's evaluation is already logged (a resumed run): one of
        :attr:`drift_metrics` at step 0. Other step-0 records (e.g. DPO's pair counts) do not
        count."""
        return bool(set(self.drift_metrics) & set(self.step0_values()))

    def step0_values(self) -> dict[str, float]:
        """The metrics logged at step 0 (the starting model's evaluation)."""
        return {
            r["name"]: r["value"]
            for r in self.run.read_metrics()
            if r["step"] == 0 and r["value"] is not None
        }

    def drift(self, values: dict[str, float]) -> dict[str, float]:
        """``prior_drift/<name>``: each of :attr:`drift_metrics` in ``values`` minus its value at
        step 0 (nothing at step 0 itself)."""
        if self.step == 0:
            return {}
        before = self.step0_values()
        return {
            f"prior_drift/{k}": values[k] - before[k]
            for k in self.drift_metrics
            if k in values and k in before
        }

    def check_finite(self, loss: Any) -> None:
        """Raise :class:`~trainers.train.NonFiniteLoss` for a non-finite ``loss`` (a method's
        step calls it before :meth:`optimizer_step`)."""
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"non-finite loss ({value}) at step {self.step + 1}")

    def window(self, name: str, value: float) -> None:
        """Add ``value`` to the metric ``name``, logged averaged at the next log line."""
        if not hasattr(self, "_window"):
            self._window = {}
        self._window.setdefault(name, []).append(value)

    def extra_metrics(self) -> dict[str, float]:
        """The :meth:`window` metrics, averaged over the steps since the last log line."""
        window = getattr(self, "_window", {})
        out = {k: sum(v) / len(v) for k, v in window.items() if v}
        window.clear()
        return out

    def load_init(self) -> ExportedModel:
        """The starting export on this trainer's device (denoiser in train mode, gradients
        on; text encoder frozen)."""
        exported = load_export(self.init.export, self.device)
        if float(exported.meta["shift"]) != self.shift:
            raise WeightsError(
                f"export {self.init.export} was trained with shift {exported.meta['shift']} "
                f"but its config gives {self.shift}"
            )
        text = exported.text_encoder.requires_grad_(False).eval()
        text.trainable = False  # frozen: FlowNet keeps it out of parameters() and checkpoints
        exported.denoiser.train().requires_grad_(True)
        return exported

    def build_net(self) -> FlowNet:
        exported = self.load_init()
        return FlowNet(exported.denoiser, exported.text_encoder)

    def config_hash(self) -> str:
        return self.pcfg.hash()

    # -- LoRA (configs with ``lora``: fine-tuning, preference tuning) --------------------------
    @property
    def lora_rank(self) -> int:
        """The config's ``lora.rank`` (0: every weight trains, or the config has no LoRA)."""
        lora = getattr(self.pcfg, "lora", None)
        return lora.rank if lora is not None else 0

    def adapter_info(self) -> dict[str, Any]:
        """What the adapter's ``harness.json`` records beyond its base and step."""
        return {}

    def export_denoiser(self, net: FlowNet) -> Any:
        """A LoRA run exports its adapters merged into a copy of the backbone."""
        if self.lora_rank == 0:
            return net.denoiser
        from trainers.finetune.lora import merged_copy
        from trainers.models import Denoiser

        return Denoiser(net.denoiser.backbone, merged_copy(net.denoiser.transformer))

    def export(self) -> None:
        """The merged export, and a LoRA run's adapter in ``final/lora/`` (peft format)."""
        super().export()
        if self.dist.main and self.lora_rank > 0:
            from trainers.finetune.lora import save_adapter

            info = {"base": str(self.init.export.resolve()), "step": self.step}
            info |= self.adapter_info()
            save_adapter(self.ema_model().denoiser.transformer, self.run.final / "lora", info)

    def export_info(self) -> dict[str, Any]:
        """Where training started, and the flow config it trained under (a later post-training
        run that starts from this one reads it)."""
        return {
            "init": str(self.init.export.resolve()),
            "flow_config": self.cfg.model_dump(mode="json"),
        }


def check_single_process(dist_: Dist, what: str) -> None:
    """Post-trainers that call the model outside DDP refuse ``torchrun``."""
    if dist_.world > 1:
        raise ConfigError(
            f"{what} runs in one process; launch it without torchrun (resources.gpus_per_trial: 1)"
        )
