"""Exports open with plain diffusers and give the harness's images.

Tiny random models (micro backbones, 16x16 images, a few steps) are exported with
``save_export``; one subprocess loads every export with ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)`` under an import guard that refuses this project's packages, samples,
and the images are compared with ``load_export(...).generate(...)`` in this process. The frozen
text encoders are tiny random CLIP / T5 / BERT (the MiniLM architecture) models with tokenizers
built offline.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

import trainers.pipeline_export as shipped
from trainers.config import TextConfig
from trainers.data.shapes import caption_vocabulary
from trainers.errors import WeightsError
from trainers.export import (
    PIPELINE_FILE,
    VOCAB_ENCODER_FILE,
    load_export,
    save_export,
)
from trainers.models import build_denoiser
from trainers.text import (
    FROZEN_ENCODER_FILE,
    CLIPTextEncoder,
    MiniLMTextEncoder,
    VocabTextEncoder,
    build_text_encoder,
    save_text_encoder,
)

PROMPTS = ["a small red circle", "", "a blue square on the left"]
SEEDS = [0, 3, 123456]
TOLERANCE = 1e-5
PROJECT_PACKAGES = ("trainers", "evaluators", "harness", "app", "bench", "tests")
# What the shipped pipeline file may import (top-level modules).
ALLOWED_IMPORTS = {
    "__future__",
    "collections",
    "itertools",
    "re",
    "typing",
    "torch",
    "diffusers",
    "transformers",
}


# ---------------------------------------------------------------------------------------------
# tiny models


def _vocab_encoder() -> VocabTextEncoder:
    torch.manual_seed(1)
    enc = VocabTextEncoder(vocabulary=caption_vocabulary(), width=32, layers=1, heads=2)
    with torch.no_grad():  # away from the init, so the text matters
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return enc.eval()


def _write_tiny_clip(directory: Path) -> Path:
    """A CLIP text tower with a projection and a byte-level BPE tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {c: i + 2 for i, c in enumerate(chars)}
    vocab |= {c + "</w>": i + 2 + len(chars) for i, c in enumerate(chars)}
    merges = ["r e", "re d</w>"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    torch.manual_seed(2)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModelWithProjection(config).save_pretrained(directory)
    return directory


def _write_tiny_t5(directory: Path) -> Path:
    """A T5 encoder with a Unigram tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["a", "red", "blue", "circle", "square", "on", "the", "left", "small"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(directory)
    torch.manual_seed(3)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(directory)
    return directory


def _write_tiny_bert(directory: Path) -> Path:
    """A BERT model (the MiniLM architecture) with a WordPiece vocabulary."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "circle"]
    words += ["square", "on", "the", "left", "small"]
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tok_config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))
    torch.manual_seed(4)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
    )
    BertModel(config).save_pretrained(directory)
    return directory


def _write_tiny_vae(directory: Path) -> Path:
    torch.manual_seed(5)
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=0.7,
        shift_factor=0.1,
    ).save_pretrained(directory)
    return directory


# ---------------------------------------------------------------------------------------------
# the exports


@dataclass
class Case:
    """One export and how it is sampled (``load_export(...).generate`` keyword arguments)."""

    backbone: str
    encoder: str = "vocab"
    generate: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] | None = None
    latent: bool = False


CASES: dict[str, Case] = {
    "sd3_euler_cfg3": Case("sd3", generate={"steps": 2, "solver": "euler", "guidance": 3.0}),
    "unet_euler_cfg3": Case("unet", generate={"steps": 2, "solver": "euler", "guidance": 3.0}),
    "pixart_heun_cfg2": Case("pixart", generate={"steps": 3, "solver": "heun", "guidance": 2.0}),
    "sd3_consistency_student": Case(
        "sd3",
        generate={"steps": 2},
        distill={"method": "consistency", "sampler": "consistency", "steps": 2, "guidance": 1.5},
    ),
    "sd3_ode_student": Case(
        "sd3",
        generate={"steps": 2},
        distill={"method": "progressive", "sampler": "ode", "steps": 2, "guidance": 1.5},
    ),
    "sd3_clip": Case("sd3", "clip", generate={"steps": 2, "guidance": 3.0}),
    "pixart_t5": Case("pixart", "t5", generate={"steps": 2, "guidance": 3.0}),
    "unet_minilm": Case("unet", "minilm", generate={"steps": 2, "guidance": 3.0}),
    "sd3_vae_latents": Case("sd3", generate={"steps": 2, "guidance": 3.0}, latent=True),
}
SHIFT = 2.0


@dataclass
class Built:
    root: Path
    sources: dict[str, Path]  # frozen encoder kind / "vae" -> the original directory


def _encoder(kind: str, sources: dict[str, Path]) -> torch.nn.Module:
    if kind == "vocab":
        return _vocab_encoder()
    if kind == "minilm":  # the MiniLM wrapper (masked mean, L2-normalised) over a tiny BERT
        return MiniLMTextEncoder(path=str(sources["minilm"]), max_length=8)
    return build_text_encoder(TextConfig(encoder=kind, path=str(sources[kind]), max_length=8))


def _export(directory: Path, case: Case, sources: dict[str, Path]) -> None:
    encoder = _encoder(case.encoder, sources)
    channels, size = (4, 8) if case.latent else (3, 16)
    torch.manual_seed(6)
    denoiser = build_denoiser(
        case.backbone,
        "micro",
        sample_size=size,
        channels=channels,
        text_dim=encoder.dim,
        pooled_dim=encoder.pooled_dim,
    )
    with torch.no_grad():  # zero-initialised output layers would make every image the noise
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    info: dict[str, Any] = {
        "latent_shape": [channels, size, size],
        "text_encoder": case.encoder,
        "vae": str(sources["vae"]) if case.latent else None,
        "vae_subfolder": None,
    }
    if case.distill:
        info["distill"] = case.distill | {"teacher": "/nonexistent/teacher/final"}
    save_export(directory, denoiser.eval(), encoder, shift=SHIFT, info=info)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("exports")
    sources = {
        "clip": _write_tiny_clip(root / "src" / "clip"),
        "t5": _write_tiny_t5(root / "src" / "t5"),
        "minilm": _write_tiny_bert(root / "src" / "bert"),
        "vae": _write_tiny_vae(root / "src" / "vae"),
    }
    for name, case in CASES.items():
        _export(root / name, case, sources)
    return Built(root, sources)


_LOAD_SCRIPT = """
import importlib.abc, json, sys

BLOCKED = tuple(sys.argv[3].split(","))


class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the shipped pipeline imported {name}")
        return None


sys.meta_path.insert(0, Guard())

import torch
from diffusers import DiffusionPipeline

root, calls = sys.argv[1], json.loads(sys.argv[2])
out = {}
for name, kwargs in calls.items():
    pipe = DiffusionPipeline.from_pretrained(f"{root}/{name}", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    out[name] = {
        "class": type(pipe).__name__,
        "images": pipe(**kwargs, output_type="pt").images,
        "np": pipe(**kwargs, output_type="np").images if name == "sd3_euler_cfg3" else None,
    }
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
torch.save(out, f"{root}/diffusers_out.pt")
"""


def _pipeline_kwargs(case: Case) -> dict[str, Any]:
    g = case.generate
    kwargs: dict[str, Any] = {"prompt": PROMPTS, "seeds": SEEDS, "num_inference_steps": g["steps"]}
    if "guidance" in g:
        kwargs["guidance_scale"] = g["guidance"]
    if "solver" in g:
        kwargs["solver"] = g["solver"]
    return kwargs


@pytest.fixture(scope="module")
def diffusers_out(built: Built) -> dict[str, Any]:
    """Every export sampled by diffusers in one subprocess that cannot import this project."""
    calls = {name: _pipeline_kwargs(case) for name, case in CASES.items()}
    blocked = ",".join(PROJECT_PACKAGES)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    # Dynamic modules (the shipped files) are copied under HF_HOME: keep them out of ~/.cache.
    env |= {
        "HF_HOME": str(built.root / "hf"),
        "HF_HUB_OFFLINE": "1",
        # As many threads as here: CPU convolutions round differently with another thread
        # count (UNet images differed by ~5e-6 with 1 thread there and 2 here).
        "OMP_NUM_THREADS": str(torch.get_num_threads()),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(built.root), json.dumps(calls), blocked],
        cwd=built.root,  # not the repository: its packages must not be importable from "."
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(built.root / "diffusers_out.pt", weights_only=False)


# ---------------------------------------------------------------------------------------------
# the shipped file


def _top_level_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the shipped pipeline"
            names.add((node.module or "").split(".")[0])
    return names


def test_shipped_pipeline_imports_only_torch_diffusers_transformers(built: Built) -> None:
    source = Path(shipped.__file__).read_text()
    imports = _top_level_imports(source)
    assert imports <= ALLOWED_IMPORTS, imports - ALLOWED_IMPORTS
    assert not imports & set(PROJECT_PACKAGES)
    # The export ships this very file (the pipeline, and the vocab encoder's component file).
    export = built.root / "sd3_euler_cfg3"
    assert (export / PIPELINE_FILE).read_text() == source
    assert (export / "text_encoder" / VOCAB_ENCODER_FILE).read_text() == source


def test_export_layout_is_a_diffusers_pipeline(built: Built) -> None:
    vocab = built.root / "sd3_euler_cfg3"
    index = json.loads((vocab / "model_index.json").read_text())
    assert index["_class_name"] == ["harness_pipeline", "HarnessFlowPipeline"]
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["text_encoder"] == ["vocab_text_encoder", "VocabTextEncoder"]
    assert index["tokenizer"] == [None, None] and index["vae"] == [None, None]
    assert (index["sample_channels"], index["sample_height"], index["sample_width"]) == (3, 16, 16)
    assert index["student_sampler"] is None
    scheduler = json.loads((vocab / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == SHIFT

    student = json.loads((built.root / "sd3_consistency_student" / "model_index.json").read_text())
    assert (student["student_sampler"], student["student_steps"]) == ("consistency", 2)

    clip = built.root / "sd3_clip"
    index = json.loads((clip / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert (index["text_encoder_kind"], index["max_length"]) == ("clip", 8)
    # Standard transformers folders: they load with transformers alone.
    model = CLIPTextModelWithProjection.from_pretrained(clip / "text_encoder")
    assert model.config.projection_dim == 24
    assert (clip / "tokenizer" / "tokenizer_config.json").is_file()
    record = json.loads((clip / "text_encoder" / FROZEN_ENCODER_FILE).read_text())
    assert record["path"] == str(built.sources["clip"])  # the original, for the record
    assert record["copy"]["model_class"] == "CLIPTextModelWithProjection"

    latent = json.loads((built.root / "sd3_vae_latents" / "model_index.json").read_text())
    assert latent["vae"] == ["diffusers", "AutoencoderKL"]
    assert (built.root / "sd3_vae_latents" / "vae" / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# diffusers reproduces load_export


def test_the_pipeline_runs_without_this_project(diffusers_out: dict[str, Any]) -> None:
    assert diffusers_out["imported"] == []
    assert {diffusers_out[n]["class"] for n in CASES} == {"HarnessFlowPipeline"}


@pytest.mark.parametrize("name", list(CASES))
def test_diffusers_pipeline_matches_load_export(
    name: str, built: Built, diffusers_out: dict[str, Any]
) -> None:
    case = CASES[name]
    ref = load_export(built.root / name).generate(PROMPTS, SEEDS, **case.generate)  # [-1, 1]
    images = diffusers_out[name]["images"]  # [0, 1]
    assert images.shape == ref.shape == (len(PROMPTS), 3, 16, 16)
    diff = (images * 2 - 1 - ref).abs().max().item()
    print(f"{name}: max |diffusers - load_export| = {diff:.3g}")
    assert diff <= TOLERANCE
    assert ref.std() > 0.05  # not a constant image: the comparison means something
    if diffusers_out[name]["np"] is not None:  # NHWC floats in [0, 1], as diffusers returns
        np_images = torch.from_numpy(diffusers_out[name]["np"]).permute(0, 3, 1, 2)
        assert (np_images - images).abs().max() <= 1e-6


def test_student_and_flow_differ(diffusers_out: dict[str, Any]) -> None:
    """The student's sampler is really used (not the flow ODE with guidance)."""
    a = diffusers_out["sd3_consistency_student"]["images"]
    b = diffusers_out["sd3_ode_student"]["images"]
    assert (a - b).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------
# the pipeline class in this process (no dynamic modules): arguments


def _in_process_pipeline(export: Path, **config: Any) -> shipped.HarnessFlowPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    index = json.loads((export / "model_index.json").read_text())
    settings = {k: v for k, v in index.items() if not isinstance(v, list) and k[0] != "_"}
    pipe = shipped.HarnessFlowPipeline(
        transformer=SD3Transformer2DModel.from_pretrained(export / "transformer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(export / "scheduler"),
        text_encoder=shipped.VocabTextEncoder.from_pretrained(export / "text_encoder"),
        **(settings | config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pipeline_arguments(built: Built) -> None:
    export = built.root / "sd3_euler_cfg3"
    pipe = _in_process_pipeline(export)
    # One prompt, several seeds: the prompt is repeated; seeds default to 0, 1, ...
    one = pipe("a red circle", seeds=[3, 4], num_inference_steps=2, output_type="pt").images
    ref = load_export(export).generate(["a red circle"] * 2, [3, 4], steps=2)
    assert (one * 2 - 1 - ref).abs().max() <= TOLERANCE
    default = pipe(["a", "b"], num_inference_steps=1, output_type="pt").images
    assert torch.equal(default, pipe(["a", "b"], [0, 1], 1, output_type="pt").images)
    # Results do not depend on the batch size.
    small = pipe(PROMPTS, SEEDS, 2, output_type="pt", batch_size=3).images
    assert (small - pipe(PROMPTS, SEEDS, 2, output_type="pt").images).abs().max() <= TOLERANCE
    pil = pipe(["a red circle"], [0], 1).images
    assert len(pil) == 1 and pil[0].size == (16, 16)
    assert pipe(["a"], [0], 1, output_type="latent").images.shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="2 prompts but 3 seeds"):
        pipe(["a", "b"], [0, 1, 2])
    with pytest.raises(ValueError, match="unknown solver"):
        pipe(["a"], [0], solver="rk4")
    student = _in_process_pipeline(export, student_sampler="consistency", student_steps=2)
    with pytest.raises(ValueError, match="without guidance"):
        student(["a"], [0], guidance_scale=3.0)
    with pytest.raises(ValueError, match="unknown student_sampler"):
        _in_process_pipeline(export, student_sampler="dmd")


# ---------------------------------------------------------------------------------------------
# load_export: new frozen copies and old exports


def test_frozen_export_loads_without_the_original(tmp_path: Path) -> None:
    """The export's copy of a frozen encoder is loaded, not the recorded original path."""
    sources = {"clip": _write_tiny_clip(tmp_path / "clip")}
    export = tmp_path / "export"
    _export(export, CASES["sd3_clip"], sources)
    ref = load_export(export).generate(PROMPTS[:2], SEEDS[:2], steps=2)
    original = build_text_encoder(
        TextConfig(encoder="clip", path=str(sources["clip"]), max_length=8)
    )
    shutil.rmtree(sources["clip"])
    model = load_export(export)
    assert isinstance(model.text_encoder, CLIPTextEncoder)
    assert model.text_encoder.model_dir == (export / "text_encoder").resolve()
    assert torch.equal(model.generate(PROMPTS[:2], SEEDS[:2], steps=2), ref)
    # The copy (model and tokenizer) encodes like the original encoder (same batches: results
    # may differ in the last bit with the batch size, hence no cached rows).
    model.text_encoder.clear_cache()
    copy, orig = model.text_encoder(PROMPTS), original(PROMPTS)
    assert torch.equal(copy.mask, orig.mask)
    assert torch.equal(copy.tokens, orig.tokens) and torch.equal(copy.pooled, orig.pooled)


def test_a_modified_frozen_copy_is_refused(built: Built, tmp_path: Path) -> None:
    export = tmp_path / "export"
    shutil.copytree(built.root / "pixart_t5", export)
    weights = export / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(WeightsError, match="re-export"):
        load_export(export)


def _write_old_export(directory: Path, new: Path, encoder: torch.nn.Module) -> None:
    """An export as written before model_index.json: transformer/, text_encoder/ (vocab weights,
    or the frozen encoder's record only), scheduler/, harness.json."""
    directory.mkdir()
    for sub in ("transformer", "scheduler"):
        shutil.copytree(new / sub, directory / sub)
    shutil.copy(new / "harness.json", directory / "harness.json")
    save_text_encoder(encoder, directory / "text_encoder")


@pytest.mark.parametrize("name", ["sd3_euler_cfg3", "sd3_clip"])
def test_old_exports_still_load(name: str, built: Built, tmp_path: Path) -> None:
    new = built.root / name
    kind = CASES[name].encoder
    encoder = _encoder(kind, built.sources) if kind != "vocab" else load_export(new).text_encoder
    old = tmp_path / "old"
    _write_old_export(old, new, encoder)
    assert not (old / "model_index.json").exists()
    if kind != "vocab":
        assert not list((old / "text_encoder").glob("*.safetensors"))  # referenced only
    generate = CASES[name].generate
    images = load_export(old).generate(PROMPTS, SEEDS, **generate)
    assert torch.equal(images, load_export(new).generate(PROMPTS, SEEDS, **generate))
