"""LoRA through peft: adapters injected into the backbone, saved as a peft adapter, merged for
the full export.

An adapter is written as peft writes one (``adapter_config.json`` + ``adapter_model.safetensors``,
keys without the adapter name, as ``get_peft_model_state_dict`` gives them) and is loaded onto
its base transformer with :func:`load_adapter` (peft's ``inject_adapter_in_model`` +
``set_peft_model_state_dict``). The run's ``final/transformer`` holds the merged weights, so the
export opens like any other without peft.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainers.finetune.config import LoraSettings

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_INFO",
    "ADAPTER_WEIGHTS",
    "DEFAULT_TARGETS",
    "add_lora",
    "load_adapter",
    "merged_copy",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_INFO = "harness.json"
"""What the adapter was trained from and for (base export, method, token); not read by peft."""

DEFAULT_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
"""The attention projections, as diffusers' DreamBooth LoRA scripts target by default; every
backbone in ``trainers.models.BACKBONES`` names them so."""


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules or DEFAULT_TARGETS),
        init_lora_weights="gaussian",
    )


def add_lora(transformer: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``transformer`` in place; afterwards only the adapters require
    gradients (peft freezes the base weights). Raises ``ValueError`` when no module matches
    ``target_modules``."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(lora_config(settings), transformer)
    except ValueError as err:
        raise ValueError(
            f"lora.target_modules {list(settings.target_modules or DEFAULT_TARGETS)} "
            f"matches no layer of {type(transformer).__name__} ({err}); name linear layers such "
            "as to_q, to_k, to_v, to_out.0"
        ) from None
    return transformer


def save_adapter(transformer: nn.Module, directory: Path, info: dict[str, Any]) -> None:
    """``directory/adapter_config.json`` (peft's LoraConfig), ``adapter_model.safetensors``
    (``transformer``'s adapter weights) and ``harness.json`` (``info``)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    config = _injected_config(transformer)
    config.save_pretrained(str(directory))
    state = get_peft_model_state_dict(transformer)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_adapter(transformer: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``transformer`` (its base) in place."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = Path(directory)
    config = LoraConfig.from_pretrained(str(directory))
    inject_adapter_in_model(config, transformer)
    result = set_peft_model_state_dict(transformer, load_file(str(directory / ADAPTER_WEIGHTS)))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter {directory} does not fit this model: {unexpected[:3]} ...")
    return transformer


def _injected_config(transformer: nn.Module) -> Any:
    config = getattr(transformer, "peft_config", {}).get("default")
    if config is None:
        raise ValueError("the model has no LoRA adapter")
    return config


@torch.no_grad()
def merged_copy(transformer: nn.Module) -> nn.Module:
    """A copy of ``transformer`` with its adapters merged into the base weights and removed: the
    same class and config as the base (``save_pretrained`` gives a plain diffusers model)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    work = copy.deepcopy(transformer)
    for module in work.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge()
    state = {}
    for key, value in work.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    plain = type(transformer).from_config(transformer.config)
    plain.load_state_dict(state, strict=True)
    return plain.to(next(transformer.parameters()).device).eval()
