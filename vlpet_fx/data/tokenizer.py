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


# ---- a checkpoint's own tokenizer --------------------------------------------------------------------------------
# Files `save_pretrained` writes for a tokenizer; any one of them marks a directory as shipping its tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model",
                   "vocab.json")
MAX_VOCAB = 2_000_000


def has_tokenizer(directory) -> bool:
    """True when ``directory`` (a text checkpoint) ships a tokenizer of its own."""
    from pathlib import Path

    d = Path(directory)
    return d.is_dir() and any((d / name).is_file() for name in TOKENIZER_FILES)


def checkpoint_tokenizer(directory):
    """The tokenizer shipped in a checkpoint directory, ready for seq2seq training: its vocabulary unchanged.

    Loaded with ``AutoTokenizer`` from the local files only (``trust_remote_code`` off: a tokenizer class is looked
    up in transformers' own mapping, nothing the directory names is imported). A tokenizer without an end token
    (BERT's) uses its separator ``[SEP]`` as the end of a target; one without a padding token gets ``<pad>`` added
    (the only token ever added, and only then: the task prompts are plain text, which every subword vocabulary
    covers). Deterministic: the same directory always gives the same tokenizer, so a run's base model can be
    rebuilt from its manifest."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from ..errors import ModelSpecError

    d = Path(directory)
    if not has_tokenizer(d):
        raise ModelSpecError(f"'{d}' ships no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save the "
                             "checkpoint's tokenizer into it with tokenizer.save_pretrained(dir)")
    try:
        tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError/... for a damaged or unknown one
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelSpecError(f"cannot load the tokenizer in '{d}': {first[:300]}; write it again with "
                             "tokenizer.save_pretrained(dir)") from None
    if not 2 <= len(tok) <= MAX_VOCAB:
        raise ModelSpecError(f"the tokenizer in '{d}' has {len(tok)} tokens (expected 2 to {MAX_VOCAB})")
    if tok.eos_token is None:
        if tok.sep_token is None:
            raise ModelSpecError(f"the tokenizer in '{d}' has neither an end token (eos) nor a separator (sep): "
                                 "set tokenizer.eos_token and save it again")
        tok.eos_token = tok.sep_token  # an alias of an existing token: nothing added
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def start_token_id(tok) -> int:
    """The decoder's first input for a checkpoint tokenizer when its config names none: BOS, else CLS, else PAD."""
    for name in ("bos_token_id", "cls_token_id", "pad_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no bos, cls or pad token")
