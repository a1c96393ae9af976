"""Property-based fuzz of the JSONL reader (issue 11): at least 2,000 generated documents of hostile lines —
wrong types, missing keys, unicode (lone surrogates included), huge and non-finite numbers, deep nesting, bytes
that are not UTF-8, paths to devices, directories and missing files. The reader may only answer with examples or
a one-line :class:`DataError`; no document takes long or much memory."""

from __future__ import annotations

import json
import resource
import time

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlpet_fx.data import DataError, Example, load_jsonl

N_DOCUMENTS = 2000

PATHS = st.sampled_from(["g.png", "c.png", "missing.png", "/dev/null", "dir", "", "../g.png", "broken.png",
                         "g.png\u0000", "\u00e9\u00e8.png", "/proc/self/status", "big.png"])
SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**300, max_value=10**400)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30) | PATHS)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3), max_leaves=6)
TEXT = st.text(max_size=40) | st.sampled_from(["", "   ", "\u2028", "\x00", "é" * 50, "what is it?"])


@st.composite
def rows(draw) -> bytes:
    """One line: a row that is almost right, or plain hostility."""
    kind = draw(st.integers(0, 8))
    if kind == 8:  # a good row (images that exist), so that documents also load
        row = {"images": draw(st.lists(st.sampled_from(["g.png", "c.png"]), min_size=1, max_size=3)),
               "input": draw(TEXT), "target": draw(st.text(min_size=1, max_size=20).filter(str.strip)),
               "task": draw(st.sampled_from(["vqa", "mine", "über"]))}
        return json.dumps(row, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if kind <= 3:  # a row with some keys right, some wrong or missing
        row = {}
        for key in ("images", "input", "target", "task", "meta"):
            if draw(st.integers(0, 5)) == 0:
                continue  # missing
            if draw(st.booleans()):
                good = {"images": draw(st.lists(PATHS, min_size=0, max_size=3) | PATHS),
                        "input": draw(TEXT), "target": draw(TEXT), "task": draw(TEXT),
                        "meta": draw(st.dictionaries(st.text(max_size=5), JSON, max_size=3))}[key]
                row[key] = good
            else:
                row[key] = draw(JSON)
        if draw(st.booleans()):
            row[draw(st.text(max_size=10))] = draw(JSON)
        text = json.dumps(row, allow_nan=True)
        if draw(st.integers(0, 9)) == 0:  # truncated
            text = text[: draw(st.integers(0, len(text)))]
        if draw(st.integers(0, 9)) == 0:  # a lone surrogate escape in a string
            text = text.replace('"input": "', '"input": "\\ud83d', 1)
        return text.encode("utf-8")
    if kind == 4:
        return draw(st.binary(max_size=60))
    if kind == 5:
        depth = draw(st.integers(1, 5000))
        return (draw(st.sampled_from(["[", "{\"a\":"])) * depth).encode()
    if kind == 6:
        return ('{"images": ["g.png"], "input": "q", "target": ' + "9" * draw(st.integers(1, 6000)) + "}").encode()
    return draw(st.text(max_size=80)).encode("utf-8", "surrogatepass")


DOCUMENTS = st.lists(rows(), min_size=0, max_size=8).map(
    lambda lines: b"\n".join(lines) + b"\n")


def test_jsonl_reader_fuzz(tmp_path):
    from PIL import Image

    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "g.png")
    Image.fromarray(np.full((6, 5, 3), 200, dtype=np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(np.zeros((300, 200), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "dir").mkdir()
    path = tmp_path / "d.jsonl"
    seen = {"documents": 0, "examples": 0, "errors": 0}
    slowest = [0.0]
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @settings(max_examples=N_DOCUMENTS, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(doc=DOCUMENTS, on_error=st.sampled_from(["stop", "skip"]))
    def check(doc: bytes, on_error: str):
        seen["documents"] += 1
        path.write_bytes(doc)
        t0 = time.perf_counter()
        try:
            examples, problems = load_jsonl(path, on_error=on_error)
        except DataError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and "\r" not in msg, msg
            seen["errors"] += 1
        else:
            assert examples and all(isinstance(e, Example) for e in examples)
            for e in examples:
                assert isinstance(e.input, str) and isinstance(e.target, str) and e.target.strip()
                assert isinstance(e.task, str) and e.task.strip() and 1 <= len(e.images) <= 32
                assert all(im.dtype == np.uint8 and im.ndim in (2, 3) for im in e.images)
                e.input.encode("utf-8")  # no lone surrogate reaches the tokenizer
            assert all(isinstance(p, str) and "\n" not in p for p in problems)
            seen["examples"] += len(examples)
        slowest[0] = max(slowest[0], time.perf_counter() - t0)

    check()
    assert seen["documents"] >= N_DOCUMENTS
    assert seen["examples"] > 0 and seen["errors"] > 0  # both answers were exercised
    assert slowest[0] < 5.0  # seconds for one document
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert grown < 300_000  # KiB
