"""Feature-extraction throughput of the FID/KID (Inception) and CMMD (CLIP) extractors.

Measures images/s of :func:`evaluators.extractors.extract_features` on the embedded shapes
images (32 px, resized by the extractor to 299 px for Inception and 336 px for CLIP ViT-L/14),
through the real loading code. The networks have **random weights at the real architecture
sizes** (torch-fidelity's FeatureExtractorInceptionV3, 23.9M parameters; a CLIPModel with the
openai/clip-vit-large-patch14-336 configuration, 428M parameters): speed depends on the shapes
of the computation, not on the values of the weights, and the machine has no network to fetch
the trained ones. One warm-up batch is excluded from the timing.

    uv run python bench/feature_bench.py [--images 64] [--batch-size 32] [--device cpu]
        [--only inception|clip] [--json bench/out/feature_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from evaluators.extractors import ClipExtractor, InceptionExtractor, extract_features
from trainers.data.shapes import ShapesDataset


def _random_inception(path: Path) -> Path:
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    class Unloaded(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # type: ignore[override]
            return None  # keep the random init; the constructor would otherwise download

    original = tfi.load_state_dict_from_url
    tfi.load_state_dict_from_url = lambda *a, **k: {}
    try:
        net = Unloaded("random", ["2048"])
    finally:
        tfi.load_state_dict_from_url = original
    torch.save(net.state_dict(), path)
    return path


def _random_clip_l14_336(directory: Path) -> Path:
    """CLIP ViT-L/14 at 336 px (the CMMD paper's model) with random weights, saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    text = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12}
    text |= {"num_attention_heads": 12, "vocab_size": 49408, "max_position_embeddings": 77}
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24}
    vision |= {"num_attention_heads": 16, "image_size": 336, "patch_size": 14}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=768)
    with torch.device("cpu"):
        model = CLIPModel(config)
    model.save_pretrained(directory)
    CLIPImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(directory)
    # A minimal byte-level tokenizer so that CLIPProcessor loads (text is not benchmarked).
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in bytes_to_unicode().values():
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special})
    )
    return directory


def _time(extractor, images: torch.Tensor, batch_size: int, device: str) -> dict:
    extract_features(extractor, images[:batch_size], batch_size=batch_size)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    extract_features(extractor, images, batch_size=batch_size)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images": len(images), "seconds": round(seconds, 2),
            "images_per_s": round(len(images) / seconds, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", choices=("inception", "clip"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    images = ShapesDataset(seed=0, split="val", size=args.images, resolution=32).images
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "load_average_start": os.getloadavg(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "inception"):
            net = InceptionExtractor(_random_inception(Path(tmp) / "inception.pth"),
                                     device=args.device)  # fmt: skip
            results["inception"] = _time(net, images, args.batch_size, args.device)
            print("inception", results["inception"], flush=True)
            del net
        if args.only in (None, "clip"):
            clip = ClipExtractor(str(_random_clip_l14_336(Path(tmp) / "clip")), device=args.device)
            results["clip_vit_l14_336"] = _time(clip, images, args.batch_size, args.device)
            print("clip_vit_l14_336", results["clip_vit_l14_336"], flush=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
