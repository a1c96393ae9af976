"""Templated vision-and-language tasks built from the real labels of an image source.

Each task samples images only from one split of the source (see :func:`images.split_indices`) and is
deterministic given ``(task, source, split, n, seed)``. ``Example.input`` holds no task prefix.

* ``vqa``     -- one image; half open questions (answer: the class name), half yes/no questions
                 (exactly balanced when the number of yes/no questions is even).
* ``gqa``     -- a 2x2 grid of 4 images of distinct classes (cells row-major in ``images``); spatial
                 and existence questions that refer to items by their (unique) class name.
* ``nlvr``    -- two images and a statement; target ``"true"``/``"false"``. Examples are made in
                 true/false pairs that share the template, so for even ``n`` every template is exactly
                 balanced (odd ``n``: one extra example of random truth). The statement text is drawn
                 before the truth value, so the text alone carries no signal.
* ``caption`` -- a 2x2 grid of 4 random images; the caption lists them in row-major order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from collections.abc import Callable

import numpy as np

from .errors import DataError
from .images import SPLITS, ImageSet, load_source, split_indices


@dataclass
class Example:
    task: str
    images: list[np.ndarray]
    input: str
    target: str
    meta: dict = field(default_factory=dict)


Builder = Callable[[ImageSet, str, int, int], "list[Example]"]
_TASKS: dict[str, Builder] = {}


def register_task(name: str):
    """Decorator registering ``builder(imageset, split, n, seed) -> list[Example]`` under ``name``."""

    def deco(builder: Builder) -> Builder:
        _TASKS[name] = builder
        return builder

    return deco


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(name: str, split: str, n: int, *, source: str = "fashion-mnist", seed: int = 0) -> list[Example]:
    if name not in _TASKS:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(list_tasks())}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise DataError(f"number of examples must be an integer >= 0, got {n!r}")
    return _TASKS[name](load_source(source), split, int(n), int(seed))


def text_only(examples: list[Example]) -> list[Example]:
    """The same examples with every image replaced by a blank (all-zero) image of the same shape."""
    return [Example(ex.task, [np.zeros_like(im) for im in ex.images], ex.input, ex.target,
                    {**ex.meta, "text_only": True}) for ex in examples]


def tile(cells: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
    """Paste equally-shaped cells into one ``rows x cols`` image (row-major)."""
    if len(cells) != rows * cols:
        raise DataError(f"tile: {len(cells)} cells for a {rows}x{cols} grid")
    shapes = {tuple(np.shape(c)) for c in cells}
    if len(shapes) != 1:
        raise DataError(f"tile: cells of different shapes {sorted(shapes)}: convert and resize them first "
                        "(vlpet_fx.data.images.to_uint8)")
    return np.concatenate([np.concatenate(cells[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)


# ----------------------------------------------------------------------------------------- helpers
def article(word: str) -> str:
    """``"an ankle boot"``, ``"a bag"``; words said with a consonant sound ("one", "uni...") take "a"."""
    w = word.lower()
    vowel = w[:1] in "aeiou" and not w.startswith(("one", "uni", "use", "eu"))
    return f"{'an' if vowel else 'a'} {word}"


class _Pool:
    """The images of one split of a source, grouped by class, with a deterministic generator."""

    def __init__(self, iset: ImageSet, split: str, seed: int, task: str, min_classes: int = 1):
        self.iset = iset
        idx = split_indices(iset, split)
        labels = iset.labels[idx]
        self.by_class = {c: idx[labels == c] for c in range(len(iset.class_names))}
        self.by_class = {c: v for c, v in self.by_class.items() if len(v)}
        self.classes = np.array(sorted(self.by_class))
        if len(self.classes) < min_classes:
            raise DataError(f"task {task!r} needs images of at least {min_classes} classes in the {split!r} split "
                            f"of {iset.name!r}, found {len(self.classes)}")
        key = [zlib.crc32(task.encode()), zlib.crc32(iset.name.encode()), SPLITS.index(split), seed & 0xFFFFFFFF]
        self.rng = np.random.default_rng(key)

    def name(self, c: int) -> str:
        return self.iset.class_names[c]

    def classes_(self, k: int, exclude=()) -> list[int]:
        """``k`` distinct random classes, none in ``exclude``."""
        pool = [int(c) for c in self.classes if int(c) not in set(exclude)]
        if len(pool) < k:
            raise DataError(f"not enough classes in {self.iset.name!r} for this task")
        return [int(c) for c in self.rng.choice(pool, size=k, replace=False)]

    def image_of(self, c: int) -> int:
        return int(self.rng.choice(self.by_class[c]))

    def meta(self, index: list[int], **extra) -> dict:
        return {"source": self.iset.name, "index": index,
                "labels": [self.name(int(self.iset.labels[i])) for i in index], **extra}

    def cells(self, index: list[int]) -> list[np.ndarray]:
        return [self.iset.images[i] for i in index]


def _kinds(rng: np.random.Generator, counts: dict[str, int]) -> list[str]:
    kinds = [k for k, m in counts.items() for _ in range(m)]
    rng.shuffle(kinds)
    return kinds


# ------------------------------------------------------------------------------------------- vqa
_OPEN_Q = ("what is in the image?", "what is shown in the picture?", "what kind of item is this?")


@register_task("vqa")
def _vqa(iset: ImageSet, split: str, n: int, seed: int) -> list[Example]:
    p = _Pool(iset, split, seed, "vqa", min_classes=2)
    n_yn = n // 2
    kinds = _kinds(p.rng, {"open": n - n_yn, "yes": n_yn - n_yn // 2, "no": n_yn // 2})
    out = []
    for kind in kinds:
        c = p.classes_(1)[0]
        i = p.image_of(c)
        if kind == "open":
            q = _OPEN_Q[int(p.rng.integers(len(_OPEN_Q)))]
            out.append(Example("vqa", p.cells([i]), q, p.name(c), p.meta([i], answer_type="other")))
        else:
            asked = c if kind == "yes" else p.classes_(1, exclude=[c])[0]
            out.append(Example("vqa", p.cells([i]), f"is this {article(p.name(asked))}?", kind,
                               p.meta([i], answer_type="yes/no", asked=p.name(asked))))
    return out


# ------------------------------------------------------------------------------------------- gqa
_POS_NAMES = ("top left", "top right", "bottom left", "bottom right")
# relation -> (cells where the referenced item may be, offset to the answer cell)
_RELATIONS = {"left of": ((1, 3), -1), "right of": ((0, 2), +1), "above": ((2, 3), -2), "below": ((0, 1), +2)}


@register_task("gqa")
def _gqa(iset: ImageSet, split: str, n: int, seed: int) -> list[Example]:
    p = _Pool(iset, split, seed, "gqa", min_classes=5)
    qtypes = ("relate", "position", "exist", "compare")
    out = []
    for _ in range(n):
        grid = p.classes_(4)
        index = [p.image_of(c) for c in grid]
        names = [p.name(c) for c in grid]
        qtype = qtypes[int(p.rng.integers(len(qtypes)))]
        extra: dict = {"qtype": qtype, "grid": names}
        if qtype == "relate":
            rel = list(_RELATIONS)[int(p.rng.integers(4))]
            where, off = _RELATIONS[rel]
            ref = int(p.rng.choice(where))
            q, a = f"what is {rel} the {names[ref]}?", names[ref + off]
            extra.update(answer_type="other", refs=[names[ref]])
        elif qtype == "position":
            pos = int(p.rng.integers(4))
            q, a = f"what is in the {_POS_NAMES[pos]}?", names[pos]
            extra.update(answer_type="other", refs=[])
        elif qtype == "exist":
            yes = bool(p.rng.integers(2))
            asked = p.name(int(p.rng.choice(grid))) if yes else p.name(p.classes_(1, exclude=grid)[0])
            q, a = f"is there {article(asked)}?", "yes" if yes else "no"
            extra.update(answer_type="yes/no", refs=[asked] if yes else [])
        else:  # compare: "is the X left of / above the Y?"
            rel = ("left of", "above")[int(p.rng.integers(2))]
            yes = bool(p.rng.integers(2))
            # cells as (first, second): left column before right column, or top row before bottom row
            pairs = [(0, 1), (2, 3), (0, 3), (2, 1)] if rel == "left of" else [(0, 2), (1, 3), (0, 3), (1, 2)]
            first, second = pairs[int(p.rng.integers(4))]
            a_cell, b_cell = (first, second) if yes else (second, first)
            q, a = f"is the {names[a_cell]} {rel} the {names[b_cell]}?", "yes" if yes else "no"
            extra.update(answer_type="yes/no", refs=[names[a_cell], names[b_cell]])
        out.append(Example("gqa", p.cells(index), q, a, p.meta(index, **extra)))
    return out


# ------------------------------------------------------------------------------------------ nlvr
_NLVR_TEMPLATES = ("left-right", "same", "different", "one-of")


def _nlvr_one(p: _Pool, template: str, truth: bool) -> tuple[str, list[int]]:
    """Draw the statement first (independently of ``truth``), then images that make it ``truth``."""
    if template == "left-right":
        x, y = (p.classes_(1)[0], p.classes_(1)[0])
        text = f"the left image shows {article(p.name(x))} and the right image shows {article(p.name(y))}."
        if truth:
            return text, [x, y]
        # false: change the left, the right or both items
        which = int(p.rng.integers(3))
        lx = p.classes_(1, exclude=[x])[0] if which in (0, 2) else x
        ry = p.classes_(1, exclude=[y])[0] if which in (1, 2) else y
        return text, [lx, ry]
    if template in ("same", "different"):
        text = ("both images show the same kind of item." if template == "same"
                else "the two images show different kinds of item.")
        same = truth if template == "same" else not truth
        if same:
            c = p.classes_(1)[0]
            return text, [c, c]
        return text, p.classes_(2)
    # one-of: true -> exactly one image shows c; false -> neither does
    c = p.classes_(1)[0]
    text = f"there is {article(p.name(c))} in one of the images."
    if truth:
        other = p.classes_(1, exclude=[c])[0]
        return text, ([c, other] if p.rng.integers(2) else [other, c])
    return text, [p.classes_(1, exclude=[c])[0] for _ in range(2)]


@register_task("nlvr")
def _nlvr(iset: ImageSet, split: str, n: int, seed: int) -> list[Example]:
    p = _Pool(iset, split, seed, "nlvr", min_classes=3)
    plan: list[tuple[str, bool]] = []
    offset = int(p.rng.integers(len(_NLVR_TEMPLATES)))
    for k in range(n // 2):
        t = _NLVR_TEMPLATES[(k + offset) % len(_NLVR_TEMPLATES)]
        plan += [(t, True), (t, False)]
    if n % 2:
        plan.append((_NLVR_TEMPLATES[int(p.rng.integers(len(_NLVR_TEMPLATES)))], bool(p.rng.integers(2))))
    order = p.rng.permutation(len(plan))
    out = []
    for j in order:
        template, truth = plan[int(j)]
        text, classes = _nlvr_one(p, template, truth)
        index = [p.image_of(c) for c in classes]
        out.append(Example("nlvr", p.cells(index), text, "true" if truth else "false",
                           p.meta(index, template=template)))
    return out


# --------------------------------------------------------------------------------------- caption
CAPTION_INPUT = "describe the grid of images."


def caption_for(names: list[str]) -> str:
    items = [article(nm) for nm in names]
    body = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return body + "."


@register_task("caption")
def _caption(iset: ImageSet, split: str, n: int, seed: int) -> list[Example]:
    p = _Pool(iset, split, seed, "caption", min_classes=1)
    idx = split_indices(iset, split)
    if not len(idx):
        raise DataError(f"the {split!r} split of {iset.name!r} holds no images")
    out = []
    for _ in range(n):
        index = [int(i) for i in p.rng.choice(idx, size=4, replace=len(idx) < 4)]
        meta = p.meta(index)
        out.append(Example("caption", p.cells(index), CAPTION_INPUT, caption_for(meta["labels"]), meta))
    return out
