"""Tests of vlpet_fx.data: image sources, templated tasks, JSONL loading and the tokenizer."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest

from vlpet_fx.data import (DataError, Example, ImageSet, build_task, build_tokenizer, list_sources, list_tasks,
                           load_jsonl, load_source, split_indices, text_only)
from vlpet_fx.data.images import FASHION_MNIST_DIR, load_fashion_mnist
from vlpet_fx.errors import VlpetError

HAVE_FASHION = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
SOURCES = [pytest.param("fashion-mnist", marks=pytest.mark.skipif(not HAVE_FASHION, reason="apt-get install "
                                                                   "dataset-fashion-mnist")),
           "mnist", "digits"]
TASKS = ["vqa", "gqa", "nlvr", "caption"]


# ---------------------------------------------------------------------------------------- sources
@pytest.mark.parametrize("name,n,hw", [("fashion-mnist", 60000, 28), ("mnist", 5000, 28), ("digits", 1797, 8)])
def test_source_shapes(name, n, hw):
    if name == "fashion-mnist" and not HAVE_FASHION:
        pytest.skip("apt-get install dataset-fashion-mnist")
    s = load_source(name)
    assert isinstance(s, ImageSet) and s.name == name
    assert s.images.shape == (n, hw, hw) and s.images.dtype == np.uint8
    assert s.labels.shape == (n,) and s.labels.dtype == np.int64
    assert len(s.class_names) == 10 and sorted(set(s.labels.tolist())) == list(range(10))
    assert s.images.max() > 200  # scaled to 0..255 (digits are 0..16 originally)
    assert load_source(name) is s  # cached


def test_class_names():
    assert load_source("digits").class_names[7] == "seven"
    if HAVE_FASHION:
        assert load_source("fashion-mnist").class_names[9] == "ankle boot"


def test_unknown_source_and_missing_fashion(tmp_path):
    assert {"fashion-mnist", "mnist", "digits"} <= set(list_sources())
    with pytest.raises(DataError, match="unknown image source 'nope'.*digits"):
        load_source("nope")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist") as ei:
        load_fashion_mnist(tmp_path)
    assert isinstance(ei.value, VlpetError) and "\n" not in str(ei.value)


@pytest.mark.parametrize("name", SOURCES)
def test_splits_partition_and_disjoint_bytes(name):
    s = load_source(name)
    parts = {sp: split_indices(s, sp) for sp in ("train", "val", "test")}
    allidx = np.concatenate(list(parts.values()))
    assert len(allidx) == len(s) and len(np.unique(allidx)) == len(s)
    assert 0.7 < len(parts["train"]) / len(s) < 0.9
    train_bytes = {s.images[i].tobytes() for i in parts["train"]}
    assert not any(s.images[i].tobytes() in train_bytes for i in parts["test"])
    with pytest.raises(DataError, match="unknown split"):
        split_indices(s, "dev")


# ------------------------------------------------------------------------------------------ tasks
def _same(a: list[Example], b: list[Example]) -> bool:
    return len(a) == len(b) and all(
        x.task == y.task and x.input == y.input and x.target == y.target and x.meta == y.meta
        and len(x.images) == len(y.images) and all(np.array_equal(i, j) for i, j in zip(x.images, y.images))
        for x, y in zip(a, b))


@pytest.mark.parametrize("task", TASKS)
def test_task_deterministic(task):
    a = build_task(task, "train", 24, source="digits", seed=3)
    b = build_task(task, "train", 24, source="digits", seed=3)
    c = build_task(task, "train", 24, source="digits", seed=4)
    assert len(a) == 24 and _same(a, b) and not _same(a, c)
    assert all(ex.task == task and ex.target and ex.input for ex in a)
    assert not any(ex.input.startswith(task + ":") for ex in a)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("task", TASKS)
def test_task_uses_only_its_split(task, source):
    s = load_source(source)
    test_idx = set(split_indices(s, "test").tolist())
    train_bytes = {s.images[i].tobytes() for i in split_indices(s, "train")}
    for ex in build_task(task, "test", 40, source=source):
        assert set(ex.meta["index"]) <= test_idx
        assert ex.meta["source"] == source
        for im, i in zip(ex.images, ex.meta["index"]):
            assert np.array_equal(im, s.images[i]) and im.tobytes() not in train_bytes
            assert im.dtype == np.uint8


def test_build_task_errors():
    with pytest.raises(DataError, match="unknown task 'x': choose one of .*vqa"):
        build_task("x", "train", 3)
    with pytest.raises(DataError, match="split"):
        build_task("vqa", "dev", 3, source="digits")
    with pytest.raises(DataError):
        build_task("vqa", "train", -1, source="digits")
    assert set(TASKS) <= set(list_tasks())


def _labels(ex: Example, source: str) -> list[str]:
    s = load_source(source)
    return [s.class_names[int(s.labels[i])] for i in ex.meta["index"]]


@pytest.mark.parametrize("source", SOURCES)
def test_vqa_answers_and_balance(source):
    exs = build_task("vqa", "train", 200, source=source, seed=1)
    yn = [ex for ex in exs if ex.meta["answer_type"] == "yes/no"]
    assert len(yn) == 100 and sum(ex.target == "yes" for ex in yn) == 50
    for ex in exs:
        (label,) = _labels(ex, source)
        assert len(ex.images) == 1 and ex.images[0].ndim == 2
        if ex.meta["answer_type"] == "yes/no":
            asked = re.fullmatch(r"is this an? (.+)\?", ex.input).group(1)
            assert ex.target == ("yes" if asked == label else "no")
        else:
            assert ex.target == label


_RELATE = {"left of": -1, "right of": +1, "above": -2, "below": +2}
_POS = {"top left": 0, "top right": 1, "bottom left": 2, "bottom right": 3}


@pytest.mark.parametrize("source", SOURCES)
def test_gqa_answers_from_grid_with_unique_refs(source):
    exs = build_task("gqa", "val", 120, source=source, seed=2)
    assert {ex.meta["qtype"] for ex in exs} == {"relate", "position", "exist", "compare"}
    yn = [ex.target for ex in exs if ex.meta["answer_type"] == "yes/no"]
    assert 0.3 < yn.count("yes") / len(yn) < 0.7
    for ex in exs:
        grid = _labels(ex, source)
        assert len(ex.images) == 4 and len(set(grid)) == 4  # distinct classes: every name is unique
        for ref in ex.meta["refs"]:
            assert grid.count(ref) == 1
        q = ex.input
        if m := re.fullmatch(r"what is (left of|right of|above|below) the (.+)\?", q):
            i = grid.index(m.group(2))
            assert ex.target == grid[i + _RELATE[m.group(1)]]
            assert (i % 2 == 1) if m.group(1) == "left of" else True
        elif m := re.fullmatch(r"what is in the (.+)\?", q):
            assert ex.target == grid[_POS[m.group(1)]]
        elif m := re.fullmatch(r"is there an? (.+)\?", q):
            assert ex.target == ("yes" if m.group(1) in grid else "no")
        elif m := re.fullmatch(r"is the (.+) (left of|above) the (.+)\?", q):
            a, b = grid.index(m.group(1)), grid.index(m.group(3))
            truth = (a % 2 < b % 2) if m.group(2) == "left of" else (a // 2 < b // 2)
            assert ex.target == ("yes" if truth else "no")
        else:
            pytest.fail(f"unexpected gqa question {q!r}")


def _nlvr_truth(text: str, left: str, right: str) -> bool:
    if m := re.fullmatch(r"the left image shows an? (.+) and the right image shows an? (.+)\.", text):
        return (left, right) == (m.group(1), m.group(2))
    if text == "both images show the same kind of item.":
        return left == right
    if text == "the two images show different kinds of item.":
        return left != right
    if m := re.fullmatch(r"there is an? (.+) in one of the images\.", text):
        return [left, right].count(m.group(1)) >= 1
    raise AssertionError(f"unexpected nlvr statement {text!r}")


@pytest.mark.parametrize("source", SOURCES)
def test_nlvr_balanced_and_consistent(source):
    exs = build_task("nlvr", "train", 160, source=source, seed=5)
    assert collections.Counter(ex.target for ex in exs) == {"true": 80, "false": 80}
    per_template = collections.Counter((ex.meta["template"], ex.target) for ex in exs)
    for t in {ex.meta["template"] for ex in exs}:
        assert per_template[(t, "true")] == per_template[(t, "false")] > 0
    for ex in exs:
        left, right = _labels(ex, source)
        assert len(ex.images) == 2
        assert _nlvr_truth(ex.input, left, right) == (ex.target == "true")


def test_nlvr_text_carries_no_signal():
    # templates with a fixed text: the identical string must be exactly as often true as false
    exs = build_task("nlvr", "val", 400, source="mnist", seed=0)
    by_text = collections.defaultdict(collections.Counter)
    for ex in exs:
        by_text[ex.input][ex.target] += 1
    for text in ("both images show the same kind of item.", "the two images show different kinds of item."):
        assert by_text[text]["true"] == by_text[text]["false"] > 0


@pytest.mark.parametrize("source", SOURCES)
def test_caption_lists_items_row_major(source):
    for ex in build_task("caption", "train", 30, source=source, seed=0):
        names = _labels(ex, source)
        art = ["an " + n if n[0] in "aeiou" and not n.startswith("one") else "a " + n for n in names]
        assert ex.target == f"{art[0]}, {art[1]}, {art[2]} and {art[3]}."
        assert len(ex.images) == 4


def test_caption_example_text():
    if not HAVE_FASHION:
        pytest.skip("apt-get install dataset-fashion-mnist")
    caps = [ex.target for ex in build_task("caption", "train", 50, seed=0)]
    assert any(" an ankle boot" in c or c.startswith("an ankle boot") for c in caps)


def test_text_only():
    exs = build_task("gqa", "train", 5, source="digits")
    blank = text_only(exs)
    for a, b in zip(exs, blank):
        assert (a.input, a.target, a.task) == (b.input, b.target, b.task)
        assert [im.shape for im in a.images] == [im.shape for im in b.images]
        assert all(im.dtype == np.uint8 and not im.any() for im in b.images)
        assert any(im.any() for im in a.images)  # originals untouched


# ------------------------------------------------------------------------------------------ jsonl
@pytest.fixture
def img_dir(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L").save(tmp_path / "img" / "g.png")
    Image.fromarray(np.full((6, 5, 3), 200, dtype=np.uint8), mode="RGB").save(tmp_path / "img" / "c.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


GOOD = {"images": ["img/g.png"], "input": "what is it?", "target": "a ramp", "task": "vqa"}


def test_jsonl_good(img_dir):
    abs_c = str(img_dir / "img" / "c.png")
    p = _write(img_dir / "d.jsonl", [GOOD, "", {"images": ["img/g.png", abs_c], "input": "x", "target": "y"}])
    exs, problems = load_jsonl(p)
    assert problems == [] and len(exs) == 2
    assert exs[0].task == "vqa" and exs[0].target == "a ramp" and exs[0].meta["line"] == 1
    g, c = exs[1].images
    assert g.shape == (8, 8) and g.dtype == np.uint8 and g[7, 7] == 63
    assert c.shape == (6, 5, 3) and c.dtype == np.uint8 and (c == 200).all()
    assert exs[1].meta["line"] == 3


BAD_ROWS = [
    ('{"images": ["img/g.png"], "input": "q"', "bad JSON"),
    ({"images": ["img/g.png"], "target": "t"}, "missing key 'input'"),
    ({"images": ["img/g.png"], "input": "q", "target": "  "}, "empty target"),
    ({"images": ["img/nope.png"], "input": "q", "target": "t"}, "not found"),
    ({"images": ["img/broken.png"], "input": "q", "target": "t"}, "unreadable image"),
]


@pytest.mark.parametrize("row,problem", BAD_ROWS)
def test_jsonl_stop_reports_line(img_dir, row, problem):
    p = _write(img_dir / "d.jsonl", [GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as ei:
        load_jsonl(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}:3: ") and problem in msg and "\n" not in msg


def test_jsonl_skip_returns_problems(img_dir):
    p = _write(img_dir / "d.jsonl", [GOOD] + [r for r, _ in BAD_ROWS] + [GOOD])
    exs, problems = load_jsonl(p, on_error="skip")
    assert len(exs) == 2 and [e.meta["line"] for e in exs] == [1, 7]
    assert len(problems) == len(BAD_ROWS)
    for k, ((_, problem), msg) in enumerate(zip(BAD_ROWS, problems), start=2):
        assert msg.startswith(f"{p}:{k}: ") and problem in msg


def test_jsonl_file_errors(img_dir):
    with pytest.raises(DataError, match="on_error"):
        load_jsonl(_write(img_dir / "d.jsonl", [GOOD]), on_error="ignore")
    with pytest.raises(DataError, match="missing.jsonl"):
        load_jsonl(img_dir / "missing.jsonl")
    p = _write(img_dir / "bad.jsonl", [r for r, _ in BAD_ROWS])
    with pytest.raises(DataError, match="no usable rows"):
        load_jsonl(p, on_error="skip")


# -------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_ids_roundtrip_and_padding():
    texts = [ex.input + " " + ex.target for ex in build_task("vqa", "train", 50, source="digits")]
    texts.append("The LEFT image shows a bag.")
    tok = build_tokenizer(texts)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    vocab = tok.get_vocab()
    words = sorted(w for w in vocab if w not in ("<pad>", "</s>", "<unk>"))
    assert [vocab[w] for w in words] == list(range(3, 3 + len(words)))  # sorted, deterministic
    assert build_tokenizer(reversed(texts)).get_vocab() == vocab

    ids = tok("is this a seven?")["input_ids"]
    assert ids[-1] == 1 and 2 not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "is this a seven ?"
    assert tok.decode(tok("the left image shows a bag")["input_ids"], skip_special_tokens=True) == \
        "the left image shows a bag"
    assert tok("zebra")["input_ids"] == [2, 1]

    batch = tok(["a b", "is this a seven?"], padding=True, return_tensors="pt")
    assert tuple(batch["input_ids"].shape) == (2, 6)
    assert batch["input_ids"][0].tolist() == [vocab["a"], 2, 1, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]
