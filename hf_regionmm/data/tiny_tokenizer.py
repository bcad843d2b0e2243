"""Offline word-level tokenizers for tiny models.

The released systems use Llama / OPT / T5 / Phi tokenizers from the Hub, which this library must not download in
tests, the demo or CI. A word-level `tokenizers` model over the synthetic data set's vocabulary plays their role:
it has the same special-token API (`bos`, `eos`, `pad`, `unk`, extra special tokens such as `<roi>` or `[SEG]`), saves
as `tokenizer.json` and reloads with `AutoTokenizer`, so processors built on it behave like the real ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["build_word_tokenizer"]

_BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


def build_word_tokenizer(
    words: Iterable[str],
    extra_special_tokens: Sequence[str] = (),
    *,
    lowercase: bool = True,
    add_bos_token: bool = True,
    model_max_length: int = 2048,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose ids are `<unk>`=0, `<s>`=1, `</s>`=2, `<pad>`=3, then `words`, then extras.

    Args:
        words: ordinary words and punctuation marks; duplicates are dropped, order is kept (ids are stable).
        extra_special_tokens: tokens that are never split (region/proxy/mask tokens such as `<roi>`, `<r0>`,
            `[SEG]`); they get the last ids, in the given order.
        lowercase: lowercase the text before splitting (the synthetic vocabulary is lowercase).
        add_bos_token: prepend `<s>` when `add_special_tokens=True`, as Llama's tokenizer does.
        model_max_length: stored on the tokenizer, as transformers tokenizers do.
        padding_side: `"right"` for training, `"left"` for batched generation.

    Text is split on whitespace and around punctuation, so `"circle."` is `["circle", "."]`; unknown words map to
    `<unk>`. Decoding joins tokens with single spaces.
    """
    if isinstance(words, str):
        raise TypeError("`words` must be an iterable of words, not one string; pass e.g. text.split().")
    if padding_side not in ("left", "right"):
        raise ValueError(f"`padding_side` must be 'left' or 'right', got {padding_side!r}.")
    vocab: dict[str, int] = {}
    for token in (*_BASE_SPECIAL_TOKENS, *words, *extra_special_tokens):
        if not isinstance(token, str) or not token or any(ch.isspace() for ch in token):
            raise ValueError(f"Every token must be a non-empty string without spaces; got {token!r}.")
        if lowercase and token not in extra_special_tokens and token not in _BASE_SPECIAL_TOKENS:
            token = token.lower()
        vocab.setdefault(token, len(vocab))

    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        backend.normalizer = normalizers.Lowercase()
    # Split off every punctuation character so "circle," and "circle" share one id.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[^\w\s]"), behavior="isolated")]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if add_bos_token:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=list(extra_special_tokens),
        model_max_length=model_max_length,
        padding_side=padding_side,
    )
    return tokenizer
