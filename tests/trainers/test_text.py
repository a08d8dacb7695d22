"""Text encoders: the trainable vocab transformer and the frozen minilm / clip / t5 wrappers.

CLIP and T5 run on tiny randomly initialised models written to a temporary directory together
with tiny tokenizers built offline, then loaded through the same code path as real weights.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import get_args

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from trainers.config import TextConfig, TextEncoderKind
from trainers.data.shapes import caption_vocabulary
from trainers.errors import WeightsError
from trainers.text import (
    FROZEN_ENCODER_FILE,
    TEXT_ENCODERS,
    CLIPTextEncoder,
    FrozenTextEncoder,
    T5TextEncoder,
    TextEncoder,
    VocabTextEncoder,
    build_text_encoder,
    load_text_encoder,
    save_text_encoder,
    split_words,
    weights_sha256,
)

CAPTIONS = ["a small red circle in the top left on a black background", "", "A BLUE square!"]


# ---------------------------------------------------------------------------------------------
# fixtures: tiny pretrained-style directories


def _write_tiny_clip(
    directory: Path, *, projection: bool, seed: int = 0, full: bool = False
) -> Path:
    """A CLIP text tower and a byte-level BPE tokenizer (vocab.json + merges.txt) in
    ``directory``, laid out like a downloaded checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    # Byte-level alphabet (every byte has a printable stand-in), each also as a word end.
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = ["r e", "re d</w>", "c i", "ci r", "cir c", "circ l", "circl e</w>", "d i", "di s"]
    for merge in merges:
        vocab["".join(merge.split())] = len(vocab)
    # The layout of a diffusers pipeline's tokenizer/ folder: no tokenizer.json, so loading
    # builds the BPE from vocab.json + merges.txt.
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special |= {"unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    tok_config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 16, **special}
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config))

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=24,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    if full:  # a whole CLIPModel (text + vision), like openai/clip-vit-base-patch32
        vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
        vision |= {"num_attention_heads": 2, "image_size": 32, "patch_size": 16}
        text = config.to_dict()
        text.pop("projection_dim")  # left at its default, as in some hub configs
        full_config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
        CLIPModel(full_config).save_pretrained(directory)
        return directory
    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    model_cls(config).save_pretrained(directory)
    return directory


def _write_tiny_t5(directory: Path, seed: int = 0) -> Path:
    """A T5 encoder with a Unigram tokenizer built with the tokenizers backend."""
    directory.mkdir(parents=True, exist_ok=True)
    words = ["a", "red", "blue", "circle", "square", "disk", "on", "the", "in", "small", "large"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    T5Tokenizer(vocab=pieces, extra_ids=0).save_pretrained(directory)
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(pieces),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
    )
    T5EncoderModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_clip(tmp_path_factory.mktemp("clip") / "model", projection=True)


@pytest.fixture(scope="module")
def clip_plain_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_clip(tmp_path_factory.mktemp("clip-plain") / "model", projection=False)


@pytest.fixture(scope="module")
def clip_full_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("clip-full") / "model"
    return _write_tiny_clip(directory, projection=True, full=True)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny_t5(tmp_path_factory.mktemp("t5") / "model")


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return build_text_encoder(TextConfig(encoder="minilm"))


def _vocab_encoder(**kwargs) -> VocabTextEncoder:
    torch.manual_seed(0)
    args = {"width": 32, "layers": 2, "heads": 2, "max_length": 12} | kwargs
    return VocabTextEncoder(vocabulary=caption_vocabulary(), **args)


def _encoder(kind: str, request: pytest.FixtureRequest) -> torch.nn.Module:
    if kind == "vocab":
        return _vocab_encoder()
    if kind == "minilm":
        return request.getfixturevalue("minilm")
    directory = request.getfixturevalue(f"{kind}_dir")
    return build_text_encoder(TextConfig(encoder=kind, path=str(directory), max_length=10))


# ---------------------------------------------------------------------------------------------
# registry and build


def test_registry_names_are_the_config_values() -> None:
    assert set(TEXT_ENCODERS) == set(get_args(TextEncoderKind))


def test_unknown_encoder_suggests_a_name() -> None:
    cfg = TextConfig.model_construct(encoder="clipp", path=None, max_length=8, width=32, layers=1)
    with pytest.raises(ValueError, match="did you mean 'clip'"):
        build_text_encoder(cfg)


def test_vocab_needs_a_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        build_text_encoder(TextConfig(encoder="vocab"), None)


def test_build_vocab_from_config() -> None:
    enc = build_text_encoder(TextConfig(width=64, layers=1, max_length=9), caption_vocabulary())
    assert isinstance(enc, VocabTextEncoder) and isinstance(enc, TextEncoder)
    assert (enc.dim, enc.pooled_dim, enc.trainable, enc.kind) == (64, 64, True, "vocab")
    assert enc.config.max_length == 9 and len(enc.blocks) == 1
    assert enc.config.width % enc.config.heads == 0


def test_a_single_string_is_refused() -> None:
    with pytest.raises(TypeError, match="single str"):
        _vocab_encoder()("a red circle")


# ---------------------------------------------------------------------------------------------
# vocab encoder


def test_split_words() -> None:
    assert split_words("A small-RED circle, in the top_left!") == [
        "a",
        "small",
        "red",
        "circle",
        "in",
        "the",
        "top",
        "left",
    ]
    assert split_words("") == [] and split_words(" ,;") == []


def test_vocab_tokenize_bos_unk_pad_and_truncation() -> None:
    enc = _vocab_encoder(max_length=5)
    ids, mask = enc.tokenize(["red zebra", "", "a b c d e f g"])
    red = enc._word_to_id["red"]
    assert ids[0].tolist() == [2, red, 1, 0, 0]  # BOS, word, UNK, PAD, PAD
    assert ids[1].tolist() == [2, 0, 0, 0, 0]  # "" is BOS alone
    assert ids[2, 0] == 2 and (ids[2] != 0).all()  # truncated to max_length, BOS kept
    assert mask.tolist()[0] == [True, True, True, False, False]
    assert mask.dtype == torch.bool and (mask == (ids != 0)).all()


def test_vocab_outputs_shapes_mask_and_pooled() -> None:
    enc = _vocab_encoder().eval()
    out = enc(CAPTIONS)
    assert out.tokens.shape == (3, 12, 32) and out.pooled.shape == (3, 32)
    assert out.mask.shape == (3, 12) and out.mask.dtype == torch.bool
    assert out.mask.sum(1).tolist() == [
        12,
        1,
        4,
    ]  # BOS + 12 words cut to 11; BOS alone; BOS + 3 words
    assert (out.tokens[~out.mask] == 0).all()  # padding is exactly zero
    assert torch.equal(out.pooled, out.tokens[:, 0])  # pooled = (normed) state at BOS
    assert torch.isfinite(out.tokens).all()


def test_vocab_padding_does_not_leak_into_real_tokens() -> None:
    # Whatever sits at the padded positions (here: their positional embeddings, scrambled)
    # must not reach the real tokens: the attention mask hides them.
    enc = _vocab_encoder().eval()
    with torch.no_grad():
        before = enc(["a red circle"])  # 4 real tokens: BOS + 3 words
        enc.position_embedding[:, 4:] += torch.randn_like(enc.position_embedding[:, 4:])
        after = enc(["a red circle"])
    torch.testing.assert_close(after.tokens, before.tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(after.pooled, before.pooled, rtol=0, atol=1e-6)
    # ... while a real word does change the result.
    assert not torch.allclose(enc(["a red square"]).pooled, before.pooled)


def test_vocab_gradient_reaches_every_parameter() -> None:
    enc = _vocab_encoder().train()
    out = enc(CAPTIONS)
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    for name, p in enc.named_parameters():
        assert p.requires_grad, name
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_vocab_round_trip_through_save_pretrained(tmp_path: Path) -> None:
    enc = _vocab_encoder(max_length=7).eval()
    with torch.no_grad():  # make the weights differ from a fresh init
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_text_encoder(enc, tmp_path / "te")
    assert (tmp_path / "te" / "config.json").is_file()
    loaded = load_text_encoder(tmp_path / "te").eval()
    direct = VocabTextEncoder.from_pretrained(tmp_path / "te").eval()
    assert isinstance(loaded, VocabTextEncoder)
    assert loaded.config.vocabulary == enc.config.vocabulary and loaded.config.max_length == 7
    with torch.no_grad():
        ref = enc(CAPTIONS)
        for other in (loaded(CAPTIONS), direct(CAPTIONS)):
            assert torch.equal(other.tokens, ref.tokens)
            assert torch.equal(other.pooled, ref.pooled)
            assert torch.equal(other.mask, ref.mask)


def test_corrupt_vocab_export_names_the_directory(tmp_path: Path) -> None:
    save_text_encoder(_vocab_encoder(), tmp_path / "te")
    (tmp_path / "te" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path / "te"))):
        load_text_encoder(tmp_path / "te")


def test_load_from_a_directory_without_an_encoder(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=re.escape(str(tmp_path))):
        load_text_encoder(tmp_path)


# ---------------------------------------------------------------------------------------------
# every encoder


@pytest.mark.parametrize("kind", ["vocab", "minilm", "clip", "t5"])
def test_empty_prompt_and_batch_contract(kind: str, request: pytest.FixtureRequest) -> None:
    enc = _encoder(kind, request)
    out = enc(["", "a red circle", ""])
    n = out.tokens.shape[1]
    assert out.tokens.shape == (3, n, enc.dim) and out.pooled.shape == (3, enc.pooled_dim)
    assert out.mask.shape == (3, n) and out.mask.dtype == torch.bool
    assert out.tokens.dtype == torch.float32 and out.pooled.dtype == torch.float32
    assert (out.mask.sum(1) >= 1).all()  # even "" has a real token (BOS / CLS / EOS)
    assert out.mask[1].sum() > out.mask[0].sum()  # real words add real tokens
    assert torch.equal(out.tokens[0], out.tokens[2]) and torch.equal(out.pooled[0], out.pooled[2])
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    # A mask row is a prefix of True values: left-aligned tokens, padding after.
    for row in out.mask:
        k = int(row.sum())
        assert row[:k].all() and not row[k:].any()
    # Batches always have the same length, so they can be concatenated (CFG does).
    assert enc(["a much longer caption about a large blue square"]).tokens.shape[1] == n


@pytest.mark.parametrize("kind", ["minilm", "clip", "t5"])
def test_frozen_encoders_have_no_trainable_parameters(
    kind: str, request: pytest.FixtureRequest
) -> None:
    enc = _encoder(kind, request)
    assert enc.trainable is False and enc.kind == kind and isinstance(enc, TextEncoder)
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # a parent module switching to train mode must not enable dropout
    assert not enc.model.training
    out = enc(["a red circle"])
    assert not out.tokens.requires_grad and not out.pooled.requires_grad


# ---------------------------------------------------------------------------------------------
# minilm (real weights, shipped in a package)


def test_minilm_is_sensible(minilm: FrozenTextEncoder) -> None:
    assert (minilm.dim, minilm.pooled_dim) == (384, 384)
    out = minilm(["a red circle", "a red disk", "a blue square"])
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(3))
    cos = out.pooled @ out.pooled.T
    assert cos[0, 1] > cos[0, 2] + 0.1


def test_minilm_pooling_is_masked_mean(minilm: FrozenTextEncoder) -> None:
    out = minilm(["a red circle on a white background"])
    m = out.mask[0]
    expected = F.normalize(out.tokens[0, m].mean(0), dim=-1)
    torch.testing.assert_close(out.pooled[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm: FrozenTextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.model_dir), device="cpu")
    captions = ["a red circle", "a large blue square in the top left on a gray background", ""]
    expected = reference.encode(captions, convert_to_tensor=True).cpu()
    torch.testing.assert_close(minilm(captions).pooled, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# clip / t5 on tiny checkpoints


def test_clip_with_projection_pools_text_embeds(clip_dir: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_dir), max_length=10))
    assert isinstance(enc, CLIPTextEncoder) and enc.projected
    assert (enc.dim, enc.pooled_dim) == (32, 24)
    out = enc(["a red circle", ""])
    batch = enc.tokenizer(["a red circle", ""], padding="max_length", max_length=10)
    ids = torch.tensor(batch["input_ids"])
    with torch.no_grad():
        ref = enc.model(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]))
    torch.testing.assert_close(out.pooled, ref.text_embeds)
    torch.testing.assert_close(out.tokens, ref.last_hidden_state)
    assert out.mask[1].sum() == 2  # "" = start + end of text


def test_full_clip_model_gives_its_text_features(clip_full_dir: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_full_dir), max_length=10))
    assert enc.projected and (enc.dim, enc.pooled_dim) == (32, 24)
    clip = CLIPModel.from_pretrained(clip_full_dir).eval()
    batch = enc.tokenizer(["a red circle", ""], padding="max_length", max_length=10)
    with torch.no_grad():
        features = clip.get_text_features(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
        )
    features = getattr(features, "pooler_output", features)  # an output object in v5
    torch.testing.assert_close(enc(["a red circle", ""]).pooled, features)


def test_clip_without_projection_pools_at_end_of_text(clip_plain_dir: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_plain_dir), max_length=10))
    assert not enc.projected and enc.pooled_dim == enc.dim == 32
    out = enc(["a red circle"])
    eos = int(out.mask[0].sum()) - 1  # the end-of-text token is the last real one
    torch.testing.assert_close(out.pooled[0], out.tokens[0, eos])


def test_clip_max_length_is_capped_by_the_position_table(clip_dir: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_dir), max_length=500))
    assert enc.max_length == 16
    assert enc(["a red circle " * 20]).tokens.shape[1] == 16


def test_t5_pools_the_masked_mean(t5_dir: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="t5", path=str(t5_dir), max_length=8))
    assert isinstance(enc, T5TextEncoder) and (enc.dim, enc.pooled_dim) == (32, 32)
    out = enc(["a red circle", ""])
    assert out.mask.sum(1).tolist() == [4, 1]  # 3 pieces + </s>; "" is </s> alone
    for i in range(2):
        m = out.mask[i]
        torch.testing.assert_close(out.pooled[i], out.tokens[i, m].mean(0))


def test_frozen_cache_skips_the_model_for_seen_captions(
    clip_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_dir), max_length=10))
    calls: list[int] = []
    forward = enc.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return forward(*args, **kwargs)

    monkeypatch.setattr(enc.model, "forward", counting_forward)
    first = enc(["a red circle", "a red disk", "a red circle"])
    assert calls == [2]  # duplicates in a batch are encoded once
    again = enc(["a red disk", "a red circle"])
    assert calls == [2]  # all cached: the model is not called
    mixed = enc(["a red circle", "a blue square"])
    assert calls == [2, 1]  # only the new caption
    torch.testing.assert_close(again.tokens, first.tokens[[1, 0]], rtol=0, atol=0)
    torch.testing.assert_close(mixed.pooled[0], first.pooled[0], rtol=0, atol=0)
    # Cached rows equal a fresh encoding (same padding, so they stack).
    fresh = build_text_encoder(TextConfig(encoder="clip", path=str(clip_dir), max_length=10))
    torch.testing.assert_close(fresh(["a red circle", "a blue square"]).tokens, mixed.tokens)
    assert set(enc._cache) == {"a red circle", "a red disk", "a blue square"}
    assert all(t.device.type == "cpu" for row in enc._cache.values() for t in row)


# ---------------------------------------------------------------------------------------------
# export records of frozen encoders


def test_frozen_export_records_and_reloads(clip_dir: Path, tmp_path: Path) -> None:
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(clip_dir), max_length=10))
    save_text_encoder(enc, tmp_path / "te")
    record = json.loads((tmp_path / "te" / FROZEN_ENCODER_FILE).read_text())
    assert record["kind"] == "clip" and record["path"] == str(clip_dir)
    assert record["max_length"] == 10 and record["weight_files"] == ["model.safetensors"]
    assert record["weights_sha256"] == weights_sha256(clip_dir)
    assert not list((tmp_path / "te").glob("*.safetensors"))  # referenced, not copied
    loaded = load_text_encoder(tmp_path / "te")
    assert isinstance(loaded, CLIPTextEncoder) and loaded.max_length == 10
    assert torch.equal(loaded(CAPTIONS).pooled, enc(CAPTIONS).pooled)


def test_minilm_export_reloads_from_the_package(minilm: FrozenTextEncoder, tmp_path: Path) -> None:
    save_text_encoder(minilm, tmp_path / "te")
    record = json.loads((tmp_path / "te" / FROZEN_ENCODER_FILE).read_text())
    assert record["kind"] == "minilm" and record["path"] is None
    assert len(record["weights_sha256"]) == 64
    loaded = load_text_encoder(tmp_path / "te")
    assert torch.equal(loaded(["a red circle"]).pooled, minilm(["a red circle"]).pooled)


def test_export_refuses_changed_weights(tmp_path: Path) -> None:
    model_dir = _write_tiny_clip(tmp_path / "clip", projection=True)
    save_text_encoder(
        build_text_encoder(TextConfig(encoder="clip", path=str(model_dir))), tmp_path / "te"
    )
    before = weights_sha256(model_dir)
    _write_tiny_clip(tmp_path / "other", projection=True, seed=1)
    shutil.copy(tmp_path / "other" / "model.safetensors", model_dir / "model.safetensors")
    assert weights_sha256(model_dir) != before
    with pytest.raises(WeightsError, match="weights_sha256") as err:
        load_text_encoder(tmp_path / "te")
    assert str(model_dir) in str(err.value)


def test_export_refuses_a_vanished_path(tmp_path: Path) -> None:
    model_dir = _write_tiny_clip(tmp_path / "clip", projection=True)
    save_text_encoder(
        build_text_encoder(TextConfig(encoder="clip", path=str(model_dir))), tmp_path / "te"
    )
    shutil.rmtree(model_dir)
    with pytest.raises(WeightsError, match="cannot be loaded any more") as err:
        load_text_encoder(tmp_path / "te")
    assert str(model_dir) in str(err.value) and "hf download" in str(err.value)


# ---------------------------------------------------------------------------------------------
# missing / malformed weights


def test_missing_path_names_the_path_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-clip"
    with pytest.raises(WeightsError) as err:
        build_text_encoder(TextConfig(encoder="clip", path=str(missing)))
    msg = str(err.value)
    assert str(missing) in msg and "hf download openai/clip-vit-base-patch32" in msg
    assert "text.path" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_hub_id_not_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        build_text_encoder(TextConfig(encoder="t5", path="someorg/not-downloaded-t5"))
    msg = str(err.value)
    assert "someorg/not-downloaded-t5" in msg and "hf download someorg/not-downloaded-t5" in msg
    assert str(tmp_path / "hub") in msg  # says where it looked


def test_hub_id_in_the_cache_loads(
    t5_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    # The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--testorg--tiny-t5"
    shutil.copytree(t5_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = build_text_encoder(TextConfig(encoder="t5", path="testorg/tiny-t5", max_length=8))
    assert enc.model_dir == (repo / "snapshots" / commit).resolve()
    assert enc(["a red circle"]).tokens.shape == (1, 8, 32)


def test_corrupt_weights_name_the_path(clip_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(WeightsError) as err:
        build_text_encoder(TextConfig(encoder="clip", path=str(broken)))
    assert str(broken) in str(err.value) and "corrupt" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_corrupt_config_names_the_file(clip_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match=re.escape(str(broken / "config.json"))):
        build_text_encoder(TextConfig(encoder="clip", path=str(broken)))


@pytest.mark.parametrize(
    ("remove", "expected"),
    [
        ("config.json", "no config.json"),
        ("model.safetensors", "no weights"),
        ("tokenizer", "no tokenizer files"),
    ],
)
def test_incomplete_directory(clip_dir: Path, tmp_path: Path, remove: str, expected: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    names = ["vocab.json", "merges.txt"] if remove == "tokenizer" else [remove]
    for name in names:
        (broken / name).unlink()
    with pytest.raises(WeightsError, match=expected) as err:
        build_text_encoder(TextConfig(encoder="clip", path=str(broken)))
    assert str(broken) in str(err.value)


def test_wrong_architecture_is_refused(t5_dir: Path) -> None:
    with pytest.raises(WeightsError, match="'t5' model"):
        build_text_encoder(TextConfig(encoder="clip", path=str(t5_dir)))


def test_pipeline_layout_finds_the_sibling_tokenizer(clip_dir: Path, tmp_path: Path) -> None:
    # diffusers pipelines keep text_encoder/ and tokenizer/ side by side.
    pipe = tmp_path / "pipe"
    shutil.copytree(clip_dir, pipe / "text_encoder")
    (pipe / "tokenizer").mkdir()
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.move(pipe / "text_encoder" / name, pipe / "tokenizer" / name)
    enc = build_text_encoder(TextConfig(encoder="clip", path=str(pipe / "text_encoder")))
    assert enc.tokenizer_dir == pipe / "tokenizer"
    assert enc([""]).mask[0].sum() == 2


def test_weights_sha256_is_the_file_content(clip_dir: Path) -> None:
    h = hashlib.sha256(b"model.safetensors\0")
    h.update((clip_dir / "model.safetensors").read_bytes())
    assert weights_sha256(clip_dir) == h.hexdigest()
