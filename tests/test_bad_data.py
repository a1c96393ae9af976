"""Bad data (issue 11, classes 3, 4 and 8): one row per bad JSONL row, image or data file, each refused by
`vlpet-fx train --data` with exit 2 and one line naming the file, the line and the problem, with nothing
written. Then ordinary data: images of any size, mode and bit depth are converted and resized, and a JSONL file
mixing them trains."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from badinput import assert_refused, run_cli, snapshot, tiny_args

from vlpet_fx.data import DataError, load_jsonl
from vlpet_fx.data.images import read_image

GOOD = {"images": ["g.png"], "input": "what is it?", "target": "a ramp", "task": "vqa"}


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` 8-bit grey pixels (with one tiny IDAT chunk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from PIL import Image

    d = tmp_path_factory.mktemp("data")
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(d / "g.png")
    (d / "broken.png").write_bytes(b"not a png at all")
    (d / "empty.png").write_bytes(b"")
    good = (d / "g.png").read_bytes()
    Image.fromarray(np.zeros((64, 64), dtype=np.uint8) + 77).save(d / "big.png")
    (d / "truncated.png").write_bytes((d / "big.png").read_bytes()[:60])
    (d / "bomb.png").write_bytes(_png_header(30000, 30000))
    (d / "wide.png").write_bytes(_png_header(20000, 1))
    (d / "folder.png").mkdir()
    assert good
    return d


def _line(row) -> str:
    return row if isinstance(row, str) else json.dumps(row)


BAD_ROWS = [
    ({**GOOD, "target": 5}, "'target' must be a string, got a number (write it in quotes: \"5\")"),
    ({**GOOD, "target": None}, "'target' must be a string, got null"),
    ({**GOOD, "target": "   "}, "empty target"),
    ({**GOOD, "input": ["a", "b"]}, "'input' must be a string, got a list"),
    ({k: v for k, v in GOOD.items() if k != "images"}, "missing key 'images'"),
    ({**GOOD, "images": []}, "'images' must be a non-empty list of file paths"),
    ({**GOOD, "images": [1]}, "'images' must be a non-empty list of file paths"),
    ({**GOOD, "images": ["g.png"] * 33}, "33 images in one row, over the limit of 32"),
    ({**GOOD, "input": "x" * 5000}, "'input' is 5,000 characters long, over the limit of 4,000"),
    ({**GOOD, "meta": {"blob": "y" * 1_000_001}}, "line is 1,0"),
    ('{"images": ["g.png"], "input": "q"', "bad JSON"),
    ("[" * 100_000, "bad JSON"),
    ('{"images": ["g.png"], "input": "q", "target": "t", "meta": {"n": 1' + "0" * 5000 + "}}", "bad JSON"),
    ("[1, 2, 3]", "expected a JSON object, got a list"),
    ({**GOOD, "task": 7}, "'task' must be a string, got a number"),
    ({**GOOD, "task": "t" * 100}, "'task' is 100 characters long"),
    ({**GOOD, "meta": [1]}, "'meta' must be a JSON object, got a list"),
    ('{"images": ["g.png"], "input": "\\ud800", "target": "t"}', "'input' holds an invalid character"),
    ({**GOOD, "images": ["nope.png"]}, "nope.png' not found"),
    ({**GOOD, "images": ["folder.png"]}, "is a directory, not a file"),
    ({**GOOD, "images": ["/dev/null"]}, "is not a regular file (a device, pipe or socket)"),
    ({**GOOD, "images": ["broken.png"]}, "unreadable image"),
    ({**GOOD, "images": ["truncated.png"]}, "unreadable image"),
    ({**GOOD, "images": ["empty.png"]}, "unreadable image"),
    ({**GOOD, "images": ["bomb.png"]}, "bomb.png is too large to decode safely"),
    ({**GOOD, "images": ["wide.png"]}, "wide.png claims 20000×1 pixels"),
    ({**GOOD, "images": ["g\u0000.png"]}, "holds a NUL character"),
]


@pytest.mark.parametrize("row, phrase", BAD_ROWS, ids=[f"row{i}" for i in range(len(BAD_ROWS))])
def test_bad_row_is_one_line_naming_file_and_line(data_dir, tmp_path, row, phrase):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join([_line(GOOD), _line(row), _line(GOOD)]) + "\n")
    before = snapshot(tmp_path)
    code, _, err = run_cli("train", *tiny_args(["--data", str(data), "--out", str(tmp_path / "run")]))
    line = assert_refused(code, err, phrase)
    assert f"{data}:2: " in line
    assert snapshot(tmp_path) == before


@pytest.fixture(autouse=True)
def _images_next_to_data(request, data_dir, tmp_path):
    """Every test's JSONL file sits in ``tmp_path``: link the images of ``data_dir`` there."""
    for p in data_dir.iterdir():
        (tmp_path / p.name).symlink_to(p, target_is_directory=p.is_dir())


def _file(tmp_path: Path, kind: str) -> str:
    p = tmp_path / "d.jsonl"
    if kind == "directory":
        p.mkdir()
    elif kind == "device":
        return "/dev/null"
    elif kind == "missing":
        pass
    elif kind == "latin-1":
        p.write_bytes(b'{"images": ["g.png"], "input": "caf\xe9?", "target": "t"}\n')
    elif kind == "empty":
        p.write_text("")
    elif kind == "blank-lines":
        p.write_text("\n  \n\t\n")
    elif kind == "all-bad-skipped":
        p.write_text(_line({**GOOD, "target": 3}) + "\n" + _line({**GOOD, "images": []}) + "\n")
    elif kind in ("rows-cap", "file-cap", "image-cap"):
        p.write_text("\n".join(_line(GOOD) for _ in range(5)) + "\n")
    return str(p)


FILE_ROWS = [
    ("directory", [], "data file '{d}' is a directory, not a file"),
    ("device", [], "data file '/dev/null' is not a regular file"),
    ("missing", [], "data file '{d}' not found"),
    ("latin-1", [], "JSONL file '{d}' is not UTF-8 text"),
    ("empty", [], "{d}: no usable rows"),
    ("blank-lines", [], "{d}: no usable rows"),
    ("all-bad-skipped", ["--on-bad-rows", "skip"], "{d}: no usable rows (2 bad rows, first: {d}:1: 'target' must"),
    ("rows-cap", [], "has more than 3 rows: split it"),
    ("file-cap", [], "over the limit of 100: use a smaller file"),
    ("image-cap", [], "image file '{t}/g.png' is "),
]


@pytest.mark.parametrize("kind, args, phrase", FILE_ROWS, ids=[r[0] for r in FILE_ROWS])
def test_bad_data_file(tmp_path, monkeypatch, kind, args, phrase):
    import vlpet_fx.data.images as images
    import vlpet_fx.data.jsonl as jsonl

    monkeypatch.setattr(jsonl, "MAX_ROWS", 3 if kind == "rows-cap" else jsonl.MAX_ROWS)
    monkeypatch.setattr(jsonl, "MAX_FILE_BYTES", 100 if kind == "file-cap" else jsonl.MAX_FILE_BYTES)
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 10 if kind == "image-cap" else images.MAX_IMAGE_BYTES)
    data = _file(tmp_path, kind)
    before = snapshot(tmp_path)
    code, _, err = run_cli("train", *tiny_args(["--data", data, *args, "--out", str(tmp_path / "run")]))
    assert_refused(code, err, phrase.format(d=data, t=tmp_path.resolve()))
    assert snapshot(tmp_path) == before


def test_eval_data_directory_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(_line(GOOD) + "\n")
    (tmp_path / "e.jsonl").mkdir()
    code, _, err = run_cli("train", *tiny_args(["--data", str(data), "--eval-data", str(tmp_path / "e.jsonl"),
                                                "--out", str(tmp_path / "run")]))
    assert_refused(code, err, f"data file '{tmp_path / 'e.jsonl'}' is a directory")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("row, phrase", [({**GOOD, "target": 5}, "'target' must be a string, got a number"),
                                         ({**GOOD, "images": ["bomb.png"]}, "too large to decode safely")])
def test_bad_row_in_a_real_process(tmp_path, row, phrase):
    data = tmp_path / "d.jsonl"
    data.write_text(_line(row) + "\n")
    code, _, err = run_cli("train", *tiny_args(["--data", str(data), "--out", str(tmp_path / "run")]),
                           subprocess_=True)
    assert_refused(code, err, phrase)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- ordinary images
def _modes(d: Path) -> dict[str, np.ndarray]:
    """Images of many modes and sizes, written to ``d``; returns the pixels each was made from."""
    from PIL import Image

    rng = np.random.default_rng(0)
    src = {}
    a = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    Image.fromarray(a).save(d / "grey28.png")
    src["grey28.png"] = a
    c = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(c).save(d / "rgb40x30.png")
    src["rgb40x30.png"] = c
    w16 = rng.integers(0, 65536, (12, 20), dtype=np.uint16)
    Image.fromarray(w16).save(d / "grey16.png")
    src["grey16.png"] = w16
    rgba = rng.integers(0, 256, (9, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    src["rgba.png"] = rgba
    Image.new("CMYK", (5, 6), (255, 0, 0, 0)).save(d / "cmyk.tif")
    idx = rng.integers(0, 4, (10, 11), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    palette = [10, 20, 30, 200, 100, 0, 0, 255, 0, 255, 255, 255]
    pal.putpalette(palette + [0] * (768 - len(palette)))
    pal.save(d / "palette.png")
    src["palette.png"] = np.array(palette, dtype=np.uint8).reshape(4, 3)[idx]
    bits = rng.integers(0, 2, (16, 13)).astype(bool)
    Image.fromarray(bits).save(d / "onebit.png")
    src["onebit.png"] = bits
    f = rng.random((6, 9)).astype(np.float32)
    Image.fromarray(f, "F").save(d / "float.tif")
    src["float.tif"] = f
    la = rng.integers(0, 256, (4, 5, 2), dtype=np.uint8)
    Image.fromarray(la, "LA").save(d / "la.png")
    src["la.png"] = la
    return src


def test_every_mode_is_converted_as_computed_independently(tmp_path):
    src = _modes(tmp_path)
    got = {name: read_image(tmp_path / name) for name in [*src, "cmyk.tif"]}
    assert all(g.dtype == np.uint8 for g in got.values())
    np.testing.assert_array_equal(got["grey28.png"], src["grey28.png"])
    np.testing.assert_array_equal(got["rgb40x30.png"], src["rgb40x30.png"])
    # 16-bit: 0..65535 → 0..255 by dividing by 257 (65535 = 255 · 257), rounded
    np.testing.assert_array_equal(got["grey16.png"], np.rint(src["grey16.png"] / 257.0).astype(np.uint8))
    # alpha laid over black: colour × alpha / 255 (Pillow's integer compositing: within 1)
    rgba = src["rgba.png"].astype(np.float64)
    expect = rgba[..., :3] * rgba[..., 3:] / 255.0
    assert got["rgba.png"].shape == (9, 7, 3) and np.abs(got["rgba.png"] - expect).max() <= 1.0
    la = src["la.png"].astype(np.float64)
    assert got["la.png"].shape == (4, 5) and np.abs(got["la.png"] - la[..., 0] * la[..., 1] / 255.0).max() <= 1.0
    np.testing.assert_array_equal(got["palette.png"], src["palette.png"])
    np.testing.assert_array_equal(got["onebit.png"], np.where(src["onebit.png"], 255, 0).astype(np.uint8))
    np.testing.assert_array_equal(got["float.tif"], np.rint(src["float.tif"].astype(np.float64) * 255).astype(np.uint8))
    # pure cyan ink: no red, full green and blue
    assert got["cmyk.tif"].shape == (6, 5, 3) and (got["cmyk.tif"] == [0, 255, 255]).all()


def test_to_pixels_resizes_each_image_before_stacking():
    import torch
    import torch.nn.functional as F

    from vlpet_fx.vl.model import to_pixels

    rng = np.random.default_rng(1)
    ims = [rng.integers(0, 256, (28, 28), dtype=np.uint8), rng.integers(0, 256, (30, 40, 3), dtype=np.uint8),
           rng.integers(0, 256, (1, 1), dtype=np.uint8)]
    x = to_pixels(ims, 16)
    assert x.shape == (3, 3, 16, 16)
    for im, got in zip(ims, x):
        t = torch.from_numpy(im.astype(np.float32))
        t = t.expand(3, *t.shape) if t.dim() == 2 else t.permute(2, 0, 1)
        ref = F.interpolate(t[None] / 127.5 - 1.0, size=(16, 16), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(got, ref)
    # equally sized images: the same as resizing the stacked batch at once
    same = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(3)]
    batch = torch.from_numpy(np.stack(same).astype(np.float32))[:, None].expand(-1, 3, -1, -1) / 127.5 - 1.0
    torch.testing.assert_close(to_pixels(same, 16), F.interpolate(batch, size=(16, 16), mode="bilinear",
                                                                  align_corners=False))


def test_jsonl_mixing_image_sizes_and_modes_trains(tmp_path):
    src = _modes(tmp_path)
    names = [*src, "cmyk.tif"]
    rows = []
    for i, name in enumerate(names):
        rows.append({"images": [name], "input": f"what is picture {i}?", "target": f"picture {i % 3}",
                     "task": "mine"})
    rows.append({"images": names[:4], "input": "how many pictures?", "target": "four", "task": "count"})
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs, problems = load_jsonl(tmp_path / "mixed.jsonl")
    assert problems == [] and len(exs) == len(rows)
    assert {ex.images[0].shape for ex in exs[:-1]} >= {(28, 28), (30, 40, 3), (12, 20), (9, 7, 3)}
    run = tmp_path / "run"
    code, out, err = run_cli("train", *tiny_args(["--data", str(tmp_path / "mixed.jsonl"), "--out", str(run),
                                                  "--steps", "2", "--batch-size", "4"]))
    assert code == 0, err[-3000:]
    report = json.loads((run / "report.json").read_text())
    assert set(report["scores"]) == {"mine", "count"} and report["bad_rows"] == []


def test_header_is_checked_before_decoding(data_dir):
    """A 30000×30000 claim is refused from the header: decoding it would need 900 MB."""
    import resource
    import time

    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="too large to decode safely"):
        read_image(data_dir / "bomb.png")
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 900 MB buffer


def test_tile_refuses_cells_of_different_shapes():
    from vlpet_fx.data import tile

    with pytest.raises(DataError, match=r"tile: cells of different shapes \[\(2, 2\), \(3, 3\)\]"):
        tile([np.zeros((2, 2), np.uint8)] * 3 + [np.zeros((3, 3), np.uint8)], 2, 2)
    assert tile([np.ones((2, 2), np.uint8)] * 4, 2, 2).shape == (4, 4)
