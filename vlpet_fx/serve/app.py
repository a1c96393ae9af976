"""The HTTP app.

    GET  /health    {"status": "ok", "model", "requests", "batches", "largest_batch"}
    POST /predict   {"prompt": "vqa: what is this?", "images": ["<base64 PNG/JPEG>", ...],
                     "image_paths": ["a.png"] (only with --allow-paths), "num_beams": 1, "max_new_tokens": 16}
                    → {"prompt", "answer", "logprob", "tokens", "mean_logprob", "unknown_words"}

Every refusal is a 4xx with ``{"error": "<one line>"}``: a body above the size limit (413), bad JSON or a
missing/ill-typed field (400), an image that does not decode (400) or has too many pixels (413), an image path
when paths are not allowed (400) or outside the allowed directory (403). Requests arriving within
``batch_window_ms`` of each other are answered by one generate call (up to ``max_batch``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..data.errors import DataError
from ..errors import VlpetError
from ..infer.images import MAX_PIXELS, decode_image
from ..infer.predictor import MAX_BEAMS, MAX_IMAGES, MAX_NEW_TOKENS, Predictor, Query

MAX_PROMPT = 2000


@dataclass
class ServeConfig:
    max_body_bytes: int = 8 << 20
    max_pixels: int = MAX_PIXELS
    allow_paths: Path | None = None  # a directory requests may name images in; None: no paths at all
    batch_window_ms: float = 10.0
    max_batch: int = 16
    num_beams: int = 1
    max_new_tokens: int = 16

    def __post_init__(self):
        if not 1 <= self.max_batch <= 256:
            raise VlpetError(f"max_batch must be between 1 and 256, got {self.max_batch}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise VlpetError(f"batch_window_ms must be between 0 and 1000, got {self.batch_window_ms}")
        if not 1024 <= self.max_body_bytes <= 1 << 30:
            raise VlpetError(f"max_body_bytes must be between 1 KiB and 1 GiB, got {self.max_body_bytes}")
        if not 1 <= self.max_pixels <= 1 << 28:
            raise VlpetError(f"max_pixels must be between 1 and 2^28, got {self.max_pixels}")
        if self.allow_paths is not None:
            self.allow_paths = Path(self.allow_paths).resolve()
            if not self.allow_paths.is_dir():
                raise VlpetError(f"--allow-paths '{self.allow_paths}' is not a directory")


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _request_model(cfg: ServeConfig):
    from pydantic import BaseModel, ConfigDict, Field

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str = Field(min_length=1, max_length=MAX_PROMPT)
        images: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
        image_paths: list[str] = Field(default_factory=list, max_length=MAX_IMAGES)
        num_beams: int = Field(default=cfg.num_beams, ge=1, le=MAX_BEAMS)
        max_new_tokens: int = Field(default=cfg.max_new_tokens, ge=1, le=MAX_NEW_TOKENS)

    return PredictRequest


def _images_of(req, cfg: ServeConfig) -> list:
    if not req.prompt.strip():
        raise Refused(400, "prompt is blank: send the question with its task prefix, e.g. 'vqa: what is this?'")
    if not req.images and not req.image_paths:
        raise Refused(400, "no image: send base64 image bytes in 'images'")
    if len(req.images) + len(req.image_paths) > MAX_IMAGES:
        raise Refused(400, f"at most {MAX_IMAGES} images per request")
    out = []
    for i, b64 in enumerate(req.images):
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(400, f"images[{i}] is not valid base64") from None
        out.append(_decode(data, cfg, f"images[{i}]"))
    if req.image_paths and cfg.allow_paths is None:
        raise Refused(400, "image paths are not accepted by this server (start it with --allow-paths DIR); "
                           "send the image bytes in 'images'")
    for i, name in enumerate(req.image_paths):
        root = cfg.allow_paths
        try:
            path = (root / name).resolve()
        except (OSError, RuntimeError, ValueError):
            raise Refused(400, f"image_paths[{i}] is not a usable path") from None
        if not path.is_relative_to(root):
            raise Refused(403, f"image_paths[{i}] is outside the allowed directory")
        if not path.is_file():
            raise Refused(404, f"image_paths[{i}] does not exist in the allowed directory")
        try:
            size = path.stat().st_size
            if size > cfg.max_body_bytes:
                raise Refused(413, f"image_paths[{i}] is larger than {cfg.max_body_bytes:,} bytes")
            data = path.read_bytes()
        except OSError:
            raise Refused(400, f"image_paths[{i}] cannot be read") from None
        out.append(_decode(data, cfg, f"image_paths[{i}]"))
    return out


def _decode(data: bytes, cfg: ServeConfig, name: str):
    try:
        return decode_image(data, max_pixels=cfg.max_pixels, name=name)
    except DataError as exc:
        raise Refused(413 if "pixels" in str(exc) else 400, str(exc)) from None


class Batcher:
    """Collects requests for ``window`` seconds (or until ``max_batch``) and answers them with one generate call
    per (num_beams, max_new_tokens) group, on one worker thread."""

    def __init__(self, predictor: Predictor, cfg: ServeConfig):
        self.pred = predictor
        self.cfg = cfg
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlpet-generate")
        self.requests = 0
        self.batches = 0
        self.largest = 0

    async def submit(self, query: Query, num_beams: int, max_new_tokens: int):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(((num_beams, max_new_tokens), query, fut))
        return await fut

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.cfg.batch_window_ms / 1000
            while len(batch) < self.cfg.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            groups: dict[tuple, list] = {}
            for item in batch:
                groups.setdefault(item[0], []).append(item)
            for (beams, new), items in groups.items():
                live = [it for it in items if not it[2].done()]
                if not live:
                    continue
                self.batches += 1
                self.requests += len(live)
                self.largest = max(self.largest, len(live))
                try:
                    answers = await loop.run_in_executor(self.pool, lambda q=[it[1] for it in live]: self.pred.answer(
                        q, num_beams=beams, max_new_tokens=new, batch_size=len(q)))
                except Exception as exc:  # one bad batch must not stop the server
                    for it in live:
                        if not it[2].done():
                            it[2].set_exception(exc)
                    continue
                for it, a in zip(live, answers):
                    if not it[2].done():
                        it[2].set_result(a)


class BodyLimit:
    """ASGI middleware: refuse bodies above ``limit`` bytes (declared or streamed) with 413 before parsing."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            # read (and drop) a moderately larger body first, so that the client, still sending, sees the 413
            # rather than a reset connection; beyond 4x the limit the connection is simply closed after it
            if declared.isdigit() and int(declared) <= 4 * self.limit:
                await _discard(receive)
            return await _send_json(send, 413, f"request body larger than {self.limit:,} bytes")
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await _send_json(send, 413, f"request body larger than {self.limit:,} bytes")
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _discard(receive) -> None:
    """Read the rest of a request body (whose declared length is bounded by the caller) without keeping it."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect" or not msg.get("more_body", False):
            return


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _validation_message(exc) -> str:
    errs = exc.errors()
    if not errs:
        return "invalid request"
    e = errs[0]
    where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
    if e.get("type") == "json_invalid":
        return "the body is not valid JSON"
    if e.get("type") == "missing":
        return f"'{where}' is missing"
    if e.get("type") == "extra_forbidden":
        return f"unknown field '{where}'"
    return f"'{where}': {e.get('msg', 'invalid')}"


def create_app(predictor: Predictor, cfg: ServeConfig | None = None):
    """The FastAPI app answering with ``predictor`` (wrapped in the body-size limit)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    cfg = cfg or ServeConfig()
    PredictRequest = _request_model(cfg)
    batcher = Batcher(predictor, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            batcher.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vlpet-fx", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = batcher

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc)}, status_code=400)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(VlpetError)
    async def user_error(request: Request, exc: VlpetError):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.source, "requests": batcher.requests, "batches": batcher.batches,
                "largest_batch": batcher.largest}

    async def predict(req):
        from starlette.concurrency import run_in_threadpool

        images = await run_in_threadpool(_images_of, req, cfg)
        answer = await batcher.submit(Query(req.prompt, images), req.num_beams, req.max_new_tokens)
        return answer.to_dict()

    predict.__annotations__ = {"req": PredictRequest}  # a class built at run time (this module's annotations are strings)
    app.post("/predict")(predict)

    return BodyLimit(app, cfg.max_body_bytes)
