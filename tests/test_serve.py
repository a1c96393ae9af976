"""`vlpet-fx serve` in a subprocess on 127.0.0.1: real requests, bad ones (4xx with a JSON message, the server
lives on), 50 concurrent ones (batched, each answer equal to the library's own), a path sandbox."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _png(shape, seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(*shape) * 255).astype("uint8")).save(buf, format="PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(vl_run, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "a.png").write_bytes(_png((28, 28)))
    (allowed.parent / "secret.png").write_bytes(_png((28, 28)))
    port = _free_port()
    log = open(allowed.parent / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "vlpet_fx.cli.main", "serve", str(vl_run), "--host", HOST,
                             "--port", str(port), "--allow-paths", str(allowed), "--max-body-mb", "1",
                             "--max-image-pixels", "10000", "--batch-window-ms", "30", "--max-batch", "32",
                             "--max-new-tokens", "4"],
                            stdout=log, stderr=log, env=dict(os.environ, OMP_NUM_THREADS="1"))
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (log.seek(0), log.read())[1]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.5)
        yield url, allowed, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()


def post(url, body, *, raw: bytes | None = None, timeout=120):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url + "/predict", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_answers_equal_the_librarys(server, vl_run):
    import vlpet_fx
    from vlpet_fx.infer import Predictor

    url, allowed, _ = server
    png = _png((28, 28), seed=3)
    status, doc = post(url, {"prompt": "vqa: what is this?", "images": [_b64(png)]})
    assert status == 200, doc
    pred = Predictor.from_dir(vl_run)
    want = vlpet_fx.predict(pred, "vqa: what is this?", [Image.open(io.BytesIO(png))], max_new_tokens=4)
    assert doc["answer"] == want.answer
    assert doc["logprob"] == pytest.approx(want.logprob, abs=1e-4)
    assert set(doc) == {"prompt", "answer", "logprob", "tokens", "mean_logprob", "unknown_words"}


@pytest.mark.parametrize("body,raw,status,words", [
    ({"images": []}, None, 400, "prompt"),
    ({"prompt": "vqa: what?"}, None, 400, "no image"),
    ({"prompt": "   ", "images": ["AAAA"]}, None, 400, "blank"),
    ({"prompt": "vqa: what?", "images": ["%%%not base64"]}, None, 400, "base64"),
    ({"prompt": "vqa: what?", "images": [_b64(b"definitely not a png")]}, None, 400, "decoded"),
    ({"prompt": "vqa: what?", "images": [_b64(_png((200, 200)))]}, None, 413, "pixels"),
    ({"prompt": "vqa: what?", "images": ["A" * (2 << 20)]}, None, 413, "larger than"),
    (None, b"{not json", 400, "JSON"),
    ({"prompt": 3, "images": []}, None, 400, "prompt"),
    ({"prompt": "vqa: what?", "images": [], "extra": 1}, None, 400, "unknown field"),
    ({"prompt": "vqa: what?", "images": [_b64(_png((8, 8)))], "num_beams": 99}, None, 400, "num_beams"),
    ({"prompt": "vqa: what?", "image_paths": ["../secret.png"]}, None, 403, "outside"),
    ({"prompt": "vqa: what?", "image_paths": ["/etc/passwd"]}, None, 403, "outside"),
    ({"prompt": "vqa: what?", "image_paths": ["missing.png"]}, None, 404, "does not exist"),
])
def test_bad_requests_get_a_clear_4xx(server, body, raw, status, words):
    url, _, proc = server
    got, doc = post(url, body, raw=raw)
    assert got == status, doc
    assert set(doc) == {"error"} and words.lower() in doc["error"].lower()
    assert proc.poll() is None


def test_allowed_path(server):
    url, _, _ = server
    status, doc = post(url, {"prompt": "vqa: what is this?", "image_paths": ["a.png"]})
    assert status == 200, doc


def test_fifty_concurrent_requests_are_batched(server):
    url, _, proc = server
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        before = json.loads(r.read())
    pngs = [_png((28, 28), seed=i % 5) for i in range(50)]
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        futs = [pool.submit(post, url, {"prompt": "vqa: what is this?", "images": [_b64(p)]}, timeout=300)
                for p in pngs]
        results = [f.result(timeout=320) for f in futs]
    assert all(s == 200 for s, _ in results), [d for s, d in results if s != 200][:3]
    # the same image gets the same answer whichever batch it landed in
    by_seed: dict[int, set] = {}
    for i, (_, doc) in enumerate(results):
        by_seed.setdefault(i % 5, set()).add(doc["answer"])
    assert all(len(v) == 1 for v in by_seed.values())
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        after = json.loads(r.read())
    assert after["requests"] - before["requests"] == 50
    assert after["batches"] - before["batches"] < 50  # several requests shared a generate call
    assert after["largest_batch"] > 1
    assert proc.poll() is None
