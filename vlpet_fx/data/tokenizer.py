"""A tiny deterministic word-level tokenizer for the templated tasks.

Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then the words of the texts in sorted order. Text is
lower-cased and split on whitespace, each punctuation character being a token of its own; every
encoded sequence ends with ``</s>``. ``decode`` joins tokens with single spaces, so punctuation comes
back space-separated: ``"is this a bag?"`` decodes as ``"is this a bag ?"``.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

SPECIALS = ("<pad>", "</s>", "<unk>")


def _pipeline():
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                   pre_tokenizers.Punctuation(behavior="isolated")])
    return norm, pre


def build_tokenizer(texts: Iterable[str]):
    """Word-level ``PreTrainedTokenizerFast`` whose vocabulary is the words of ``texts``."""
    from transformers import PreTrainedTokenizerFast

    norm, pre = _pipeline()
    words: set[str] = set()
    for text in texts:
        words.update(tok for tok, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    words.difference_update(SPECIALS)
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({w: i for i, w in enumerate(sorted(words), start=len(SPECIALS))})

    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = norm
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    tk.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False, model_max_length=512)
