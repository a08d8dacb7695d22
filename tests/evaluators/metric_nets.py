"""Small randomly initialised networks written to disk the way real checkpoints are, so that
the image-metric tests run the real loading code with no download."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
from transformers.convert_slow_tokenizer import bytes_to_unicode


def write_tiny_clip(directory: Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """A whole ``CLIPModel`` (text + vision towers, ~100K parameters), a byte-level BPE
    tokenizer and an image processor in ``directory``, laid out like a downloaded hub model."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "i n</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    ).save_pretrained(directory)
    text = {"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64}
    text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    vision |= {"num_attention_heads": 2, "image_size": image_size, "patch_size": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(directory)
    return directory


def write_random_inception(path: Path, *, seed: int = 0) -> Path:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (the real architecture, 24M parameters)
    with random weights, saved as a state dict with ``torch.save`` like the released .pth.

    Default init makes the pool3 features collapse (FID = 0 for any images), so the
    convolutions are re-initialised with Kaiming normal: features then vary with the image.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    class _Unloaded(tfi.FeatureExtractorInceptionV3):
        # The constructor insists on loading weights (downloading without a path): skip that
        # step, we only want the freshly initialised architecture.
        def load_state_dict(self, *args, **kwargs):  # type: ignore[override]
            return None

    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *a, **k: {}  # never reached the network anyway
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _Unloaded("random", ["2048"])
            for module in net.modules():
                if isinstance(module, torch.nn.Conv2d):
                    torch.nn.init.kaiming_normal_(module.weight)
    finally:
        tfi.load_state_dict_from_url = original
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
