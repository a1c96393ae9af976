"""Task metrics for generated answers.

Every metric takes the decoded model outputs (``preds``) and the gold answers
(``refs``) and returns a percentage-style float (``0..100``; CIDEr is on the
usual "×100" paper scale and can exceed 100).

* ``exact_match`` / ``accuracy`` -- VQA, GQA, NLVR2: share of predictions equal
  to the reference after :func:`normalise`.  A reference may also be a list of
  acceptable answers; a prediction then counts if it matches any of them.
  (This is plain exact match, not the soft VQA-v2 "min(#annotators/3, 1)"
  accuracy.)
* ``bleu4`` -- corpus BLEU-4 from :class:`torchmetrics.text.BLEUScore`.
* ``cider`` -- CIDEr-D from :mod:`pycocoevalcap` (``Cider().compute_score``).

For the captioning metrics both sides are passed through :func:`normalise`
and tokenised on whitespace; the Java PTB tokenizer of the COCO toolkit is not
used, so numbers can differ slightly from the official evaluation server
(punctuation inside a sentence is kept as part of its word).

CIDEr caveat: its n-gram weights are TF-IDF with the document frequency taken
over the *reference set of the evaluated corpus*; an n-gram present in every
item's references gets weight ``log(N) - log(N) = 0``.  A corpus of one item
therefore always scores 0, and very small corpora give unstable values --
evaluate on a real split (hundreds or thousands of items), not on a handful.

Empty inputs: the individual metrics return ``0.0`` and :func:`task_scores`
returns ``{}``.  Lengths of ``preds`` and ``refs`` must match (``ValueError``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = [
    "METRICS",
    "accuracy",
    "bleu4",
    "cider",
    "exact_match",
    "main_score",
    "normalise",
    "task_scores",
]

_WS = re.compile(r"\s+")

#: Metrics computed per task; tasks not listed here use ``["exact_match"]``.
METRICS: dict[str, list[str]] = {
    "vqa": ["exact_match"],
    "gqa": ["exact_match"],
    "nlvr": ["accuracy"],
    "caption": ["bleu4", "cider"],
}

#: Headline metric reported in the papers for each task.
_MAIN: dict[str, str] = {
    "vqa": "exact_match",
    "gqa": "exact_match",
    "nlvr": "accuracy",
    "caption": "cider",
}

_DEFAULT_METRICS = ["exact_match"]
_DEFAULT_MAIN = "exact_match"


def normalise(text: str) -> str:
    """Lowercase, strip, collapse runs of whitespace, drop one trailing period.

    >>> normalise("  A  Dog\\tRuns.  ")
    'a dog runs'
    """
    text = _WS.sub(" ", str(text).lower()).strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text


def _check_lengths(preds: Sequence, refs: Sequence) -> None:
    if isinstance(preds, str) or isinstance(refs, str):
        raise TypeError("preds and refs must be sequences of strings, not a single string")
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")


def _as_ref_lists(refs: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """Wrap single reference strings into one-element lists."""
    out: list[list[str]] = []
    for i, r in enumerate(refs):
        if isinstance(r, str):
            out.append([r])
        else:
            r = [str(x) for x in r]
            if not r:
                raise ValueError(f"item {i} has no reference")
            out.append(r)
    return out


def exact_match(preds: list[str], refs: list[str] | list[list[str]]) -> float:
    """Percentage (0..100) of predictions equal to their reference after normalise.

    ``refs[i]`` may be a string or a list of acceptable answers.
    """
    _check_lengths(preds, refs)
    if not preds:
        return 0.0
    hits = 0
    for p, rs in zip(preds, _as_ref_lists(refs)):
        p = normalise(p)
        hits += any(p == normalise(r) for r in rs)
    return 100.0 * hits / len(preds)


def accuracy(preds: list[str], refs: list[str] | list[list[str]]) -> float:
    """Classification accuracy in percent (NLVR2 "true"/"false"); same as exact_match."""
    return exact_match(preds, refs)


def bleu4(preds: list[str], refs: list[list[str]] | list[str]) -> float:
    """Corpus BLEU-4 (0..100) via ``torchmetrics.text.BLEUScore(n_gram=4)``.

    Hypotheses and references are normalised first.  Sentences shorter than
    four tokens contribute no 4-grams, so an all-short corpus scores 0.
    """
    _check_lengths(preds, refs)
    if not preds:
        return 0.0
    from torchmetrics.text import BLEUScore

    hyps = [normalise(p) for p in preds]
    targets = [[normalise(r) for r in rs] for rs in _as_ref_lists(refs)]
    score = BLEUScore(n_gram=4)(hyps, targets)
    return 100.0 * float(score)


def cider(preds: list[str], refs: list[list[str]] | list[str]) -> float:
    """CIDEr-D ×100 (paper scale, e.g. 121.07) via pycocoevalcap's ``Cider``.

    Inputs are normalised and whitespace-tokenised (no Java PTB tokenizer).
    Document frequencies come from the references of this corpus, so a
    single-item corpus always gives 0; see the module docstring.
    """
    _check_lengths(preds, refs)
    if not preds:
        return 0.0
    from pycocoevalcap.cider.cider import Cider

    ref_lists = _as_ref_lists(refs)
    gts = {i: [normalise(r) for r in rs] for i, rs in enumerate(ref_lists)}
    res = {i: [normalise(p)] for i, p in enumerate(preds)}
    if not any(r for rs in gts.values() for r in rs):
        # no reference n-grams at all; pycocoevalcap would fail on max(()).
        return 0.0
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)


_FUNCS = {
    "exact_match": exact_match,
    "accuracy": accuracy,
    "bleu4": bleu4,
    "cider": cider,
}


def _task_key(task: str) -> str:
    return str(task).strip().lower()


def task_scores(
    task: str, preds: list[str], refs: list[str] | list[list[str]]
) -> dict[str, float]:
    """Compute every metric of ``task`` (``METRICS``; unknown tasks: exact_match).

    ``refs`` may hold one string per item or a list of strings per item.
    Empty input returns ``{}``.
    """
    _check_lengths(preds, refs)
    if not preds:
        return {}
    names = METRICS.get(_task_key(task), _DEFAULT_METRICS)
    return {name: _FUNCS[name](list(preds), list(refs)) for name in names}


def main_score(task: str, scores: dict[str, float]) -> float:
    """The paper's headline number for ``task``: exact_match (VQA/GQA and unknown
    tasks), accuracy (NLVR2) or cider (captioning).

    Raises ``KeyError`` if ``scores`` lacks that metric (e.g. it came from an
    empty evaluation).
    """
    name = _MAIN.get(_task_key(task), _DEFAULT_MAIN)
    try:
        return float(scores[name])
    except KeyError:
        raise KeyError(
            f"scores for task {task!r} lack its main metric {name!r} "
            f"(have {sorted(scores)})"
        ) from None
