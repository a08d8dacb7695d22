"""The fine-tuning trainer process: ``python -m trainers.finetune --config C.json --run-dir DIR``.

The post-training seam (``trainers/post.py``): the flow trainer's run directory, resume,
SIGTERM, EMA, evaluation, samples and export, starting from a finished model (``init``), with

- the data: the method's (``trainers/finetune/methods.py``): a subset, new data, or a subject's
  instance images captioned with its identifier token (a trained-vocabulary text encoder gets an
  embedding row for the token: a fixed random vector, seeded by the config's seed);
- what trains: every backbone weight, or LoRA adapters (``lora.rank > 0``; peft); the text
  encoder stays frozen;
- evaluation: the flow trainer's (on the embedded data: domain FID and attribute accuracy of
  ordinary prompts, which is the prior), the method's own (DreamBooth: subject and prompt
  fidelity) and the prior's drift: each domain metric minus its value at step 0, evaluated on
  the starting model before the first step (``prior_drift/<metric>``);
- export: ``final/`` holds the merged model (opens like any export); a LoRA run also writes its
  adapter to ``final/lora/`` (peft format, loadable onto the starting model's transformer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from trainers.finetune.config import FinetuneConfig, load_finetune_config
from trainers.finetune.lora import add_lora
from trainers.finetune.methods import METHODS, method_info
from trainers.post import PostTrainer, check_single_process, flow_view, resolve_init
from trainers.rundir import RunDir
from trainers.train import (
    BatchOrder,
    Dist,
    FlowNet,
    FlowTrainer,
    TrainData,
    main,
)


def with_words(encoder: Any, words: Sequence[str], seed: int) -> Any:
    """A trained-vocabulary text encoder (``VocabTextEncoder``) that also knows ``words``: the
    same weights, plus one embedding row per new word drawn N(0, 0.02^2) (the encoder's own
    initialisation) from a generator seeded by ``seed``. Other encoders are returned as they
    are (their tokenizers already split any word into known pieces)."""
    from trainers.text import VocabTextEncoder, split_words

    if not isinstance(encoder, VocabTextEncoder):
        return encoder
    known = set(encoder.config.vocabulary)
    new = [w for w in dict.fromkeys(w for e in words for w in split_words(e)) if w not in known]
    if not new:
        return encoder
    c = encoder.config
    out = VocabTextEncoder(
        vocabulary=[*c.vocabulary, *new],
        width=c.width,
        layers=c.layers,
        heads=c.heads,
        max_length=c.max_length,
    )
    state = encoder.state_dict()
    old = state["token_embedding.weight"]
    rows = torch.randn((len(new), old.shape[1]), generator=torch.Generator().manual_seed(seed))
    state["token_embedding.weight"] = torch.cat([old, rows.to(old) * 0.02])
    out.load_state_dict(state)
    out.trainable = encoder.trainable
    return out.to(old.device).requires_grad_(False).eval()


class FinetuneTrainer(PostTrainer):
    def __init__(self, cfg: FinetuneConfig, run: RunDir, dist_: Dist):
        check_single_process(dist_, "fine-tuning")
        self.pcfg = cfg
        self.method = METHODS[cfg.method](cfg)
        self.init = resolve_init(cfg.init, cfg.data)
        sample = cfg.sample
        prompts = self.method.sample_prompts()
        if sample.prompts is None and prompts is not None:
            sample = sample.model_copy(update={"prompts": prompts})
        dropout = cfg.cfg_dropout
        if dropout is None and cfg.method == "dreambooth":
            dropout = 0.0  # DreamBooth trains on the instance captions as given
        view = flow_view(
            self.init,
            seed=cfg.seed,
            train=cfg.train,
            eval=cfg.eval,
            sample=sample,
            data=cfg.data,
            cfg_dropout=dropout,
        )
        super().__init__(view, run, dist_)
        self.method.prepare(self)
        prior_x = getattr(self.method, "prior_x", None)
        n_prior = len(prior_x) if prior_x is not None else 1
        self.prior_order = BatchOrder(n_prior, self.cfg.train.batch_size, cfg.seed + 1)

    # -- the model ------------------------------------------------------------------------
    def load_training_data(self) -> TrainData:
        return self.method.training_data(self)

    def build_net(self) -> FlowNet:
        exported = self.load_init()
        text = with_words(exported.text_encoder, self.method.vocabulary(), self.pcfg.seed)
        denoiser = exported.denoiser
        if self.pcfg.lora.rank > 0:
            add_lora(denoiser.transformer, self.pcfg.lora)
        return FlowNet(denoiser, text)

    def adapter_info(self) -> dict[str, Any]:
        return method_info(self.pcfg)

    def export_info(self) -> dict[str, Any]:
        return super().export_info() | {"finetune": method_info(self.pcfg)}

    def sample_meta(self) -> dict[str, Any]:
        return {"method": self.pcfg.method}

    # -- one step -------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        return self.method.train_step(self)

    def flow_step(self) -> tuple[float, float]:
        """The flow trainer's step (ct, sft)."""
        return FlowTrainer.train_step(self)

    # -- evaluation -----------------------------------------------------------------------
    def evaluate_start(self) -> bool:
        return self.cfg.data.kind == "shapes"  # the domain metrics whose drift is the prior's

    def evaluate(self) -> dict[str, float]:
        values = super().evaluate()
        if not self.dist.main:
            return values
        e = self.cfg.eval
        extra = self.method.evaluate(
            self, self._generator_fn(self.ema_model(), e.solver, e.steps, e.guidance)
        )
        extra |= self.drift(values)
        if extra:
            self.run.log_metrics(self.step, extra)
        return values | extra


def run(argv: Sequence[str] | None = None) -> int:
    return main(
        argv,
        prog="python -m trainers.finetune",
        description="Fine-tune a finished model (continued training, SFT or DreamBooth; full or "
        "LoRA) and write the fine-tuned run directory.",
        load=load_finetune_config,
        make_trainer=FinetuneTrainer,
    )
