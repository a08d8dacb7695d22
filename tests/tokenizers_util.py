"""A byte-level BPE tokenizer built offline (no hub), for tests that save tiny transformers
language models and load them through the real loading code."""

from __future__ import annotations

from typing import Any


def byte_bpe_tokenizer(extra_specials: tuple[str, ...] = (), **kwargs: Any) -> Any:
    """A ``PreTrainedTokenizerFast`` over the 256 byte symbols with ``<unk> <s> </s> <pad>``
    (plus ``extra_specials``) and no merges: every character is a token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", *extra_specials]
    vocab = {s: i for i, s in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        **kwargs,
    )
