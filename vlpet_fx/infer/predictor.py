"""``predict`` and ``evaluate``: answers of a trained VL model to prompts about images, and task scores on a
held-out JSONL file or built-in task."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import VlpetError
from .generate import Generated, generate_answers, pixel_inputs

MAX_NEW_TOKENS = 64
MAX_BEAMS = 16
MAX_IMAGES = 16


@dataclass
class Query:
    """A prompt (task prefix included, e.g. ``"vqa: what is this?"``) and its images (uint8 arrays)."""

    prompt: str
    images: list[np.ndarray]


@dataclass
class Answer:
    """``answer``: the decoded text; ``logprob``: sum of the answer tokens' log-probabilities (``</s>``
    included) under the model; ``tokens``: their number; ``mean_logprob = logprob / tokens``;
    ``unknown_words``: prompt words the tokenizer maps to ``<unk>`` (the model never saw them)."""

    prompt: str
    answer: str
    logprob: float
    tokens: int
    mean_logprob: float
    unknown_words: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def check_generation(num_beams: int, max_new_tokens: int) -> None:
    if not 1 <= num_beams <= MAX_BEAMS:
        raise VlpetError(f"num_beams must be between 1 and {MAX_BEAMS}, got {num_beams}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise VlpetError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")


class Predictor:
    """A loaded model + tokenizer answering batches of :class:`Query`."""

    def __init__(self, model: nn.Module, tokenizer, *, source: str | None = None):
        self.model = model.eval()
        self.tok = tokenizer
        self.source = source
        self.device = next(model.parameters()).device

    @classmethod
    def from_dir(cls, src: str | Path, *, base=None, tokenizer=None, device: str | None = None,
                 force: bool = False) -> "Predictor":
        from .loading import load_for_inference

        model, tok = load_for_inference(src, base=base, tokenizer=tokenizer, device=device, force=force)
        return cls(model, tok, source=str(src))

    def unknown_words(self, prompt: str) -> list[str]:
        bt = getattr(self.tok, "backend_tokenizer", None)
        if bt is None or bt.pre_tokenizer is None:
            return []
        text = bt.normalizer.normalize_str(prompt) if bt.normalizer is not None else prompt
        unk = self.tok.unk_token_id
        if unk is None:
            return []
        # a word the tokenizer can only spell with its unknown token (a subword vocabulary spells most words)
        words = dict.fromkeys(w for w, _ in bt.pre_tokenizer.pre_tokenize_str(text))
        return [w for w in words if unk in self.tok(w, add_special_tokens=False)["input_ids"]]

    def answer(self, queries: list[Query], *, num_beams: int = 1, max_new_tokens: int = 16,
               batch_size: int = 16) -> list[Answer]:
        check_generation(num_beams, max_new_tokens)
        if batch_size < 1:
            raise VlpetError(f"batch_size must be at least 1, got {batch_size}")
        for q in queries:
            if not isinstance(q.prompt, str) or not q.prompt.strip():
                raise VlpetError("every query needs a non-empty prompt, e.g. 'vqa: what is this?'")
            if not 1 <= len(q.images) <= MAX_IMAGES:
                raise VlpetError(f"every query needs 1 to {MAX_IMAGES} images, got {len(q.images)}")
        out: list[Answer] = []
        for s in range(0, len(queries), batch_size):
            chunk = queries[s:s + batch_size]
            inputs = pixel_inputs(self.model, self.tok, [q.prompt for q in chunk], [q.images for q in chunk],
                                  self.device)
            gen: list[Generated] = generate_answers(self.model, self.tok, inputs, max_new_tokens=max_new_tokens,
                                                    num_beams=num_beams)
            out += [Answer(q.prompt, g.text, g.logprob, g.tokens, g.mean_logprob, self.unknown_words(q.prompt))
                    for q, g in zip(chunk, gen)]
        return out


def _predictor(src, base, tokenizer, device, force) -> Predictor:
    if isinstance(src, Predictor):
        return src
    return Predictor.from_dir(src, base=base, tokenizer=tokenizer, device=device, force=force)


def _queries_from_jsonl(path, on_bad_rows: str):
    from ..data.jsonl import load_jsonl
    from ..train.batching import task_prompt

    examples, problems = load_jsonl(path, on_error=on_bad_rows)
    return examples, [Query(task_prompt(e.task, e.input), e.images) for e in examples], problems


def predict(src, prompt: str | None = None, images: list | None = None, *, data: str | Path | None = None,
            base=None, tokenizer=None, device: str | None = None, force: bool = False, num_beams: int = 1,
            max_new_tokens: int = 16, batch_size: int = 16, on_bad_rows: str = "stop"):
    """Answer a prompt about images, or every row of a JSONL file (``data``, the format ``train`` reads; the
    prompt is ``"<task>: <input>"``).

    ``src``: a ``train`` run, a patched or adapters directory (``base``: its base model, if not the one the
    manifest names), or a :class:`Predictor`. ``images``: file paths, PIL images or uint8 arrays.
    Returns one :class:`Answer` for ``prompt``, a list for ``data``."""
    from .images import as_image

    if (prompt is None) == (data is None):
        raise VlpetError("give either a prompt (with images) or a JSONL data file, not both or neither")
    if prompt is not None and not images:
        raise VlpetError("give at least one image with the prompt")
    pred = _predictor(src, base, tokenizer, device, force)
    if prompt is not None:
        q = Query(prompt, [as_image(im) for im in images])
        return pred.answer([q], num_beams=num_beams, max_new_tokens=max_new_tokens)[0]
    _, queries, _ = _queries_from_jsonl(data, on_bad_rows)
    return pred.answer(queries, num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size)


def _run_source(src) -> str | None:
    if isinstance(src, Predictor):
        src = src.source
    if src is None:
        return None
    record = Path(src) / "run.json"
    try:
        doc = json.loads(record.read_text()) if record.is_file() else {}
    except (OSError, ValueError):
        return None
    value = doc.get("source") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def evaluate(src, *, data: str | Path | None = None, tasks: list[str] | None = None, source: str | None = None,
             n: int = 100, split: str = "test", seed: int = 0, base=None, tokenizer=None, device: str | None = None,
             force: bool = False, num_beams: int = 1, max_new_tokens: int = 16, batch_size: int = 16,
             on_bad_rows: str = "stop", out: str | Path | None = None) -> dict:
    """Score a trained model with each task's metrics (:mod:`vlpet_fx.train.metrics`) on a JSONL file (``data``)
    or on built-in tasks (``tasks``, ``n`` examples each from ``split`` of the image ``source``; default: the
    run's own source). ``out``: a new directory receiving ``predictions.jsonl`` and ``scores.json`` at once.

    Returns ``{"examples", "scores": {task: {metric: value}}, "main": {task: value}, "average", "num_beams",
    "max_new_tokens", "bad_rows", "predictions": [...]}``."""
    from ..data.tasks import build_task
    from ..train.batching import task_prompt
    from ..train.metrics import main_score, task_scores

    if (data is None) == (not tasks):
        raise VlpetError("give either a JSONL data file or built-in task names, not both or neither")
    check_generation(num_beams, max_new_tokens)
    if out is not None:
        from ..export.atomic import check_out_dir

        check_out_dir(out)
    pred = _predictor(src, base, tokenizer, device, force)
    problems: list[str] = []
    if data is not None:
        examples, queries, problems = _queries_from_jsonl(data, on_bad_rows)
    else:
        source = source or _run_source(src) or "fashion-mnist"
        examples = [e for t in tasks for e in build_task(t, split, n, source=source, seed=seed)]
        if not examples:
            raise VlpetError(f"no examples: n={n} gives none")
        queries = [Query(task_prompt(e.task, e.input), e.images) for e in examples]
    answers = pred.answer(queries, num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size)
    scores: dict[str, dict[str, float]] = {}
    for t in dict.fromkeys(e.task for e in examples):
        ii = [i for i, e in enumerate(examples) if e.task == t]
        scores[t] = task_scores(t, [answers[i].answer for i in ii], [examples[i].target for i in ii])
    main = {t: main_score(t, s) for t, s in scores.items() if s}
    rows = [{"task": e.task, "input": e.input, "prediction": a.answer, "target": e.target, "logprob": a.logprob,
             "tokens": a.tokens, **({"images": e.meta["image_paths"]} if "image_paths" in e.meta else {})}
            for e, a in zip(examples, answers)]
    result = {"examples": len(examples), "scores": scores, "main": main,
              "average": sum(main.values()) / len(main) if main else None, "num_beams": num_beams,
              "max_new_tokens": max_new_tokens, "bad_rows": problems}
    if out is not None:
        from ..export.atomic import atomic_dir

        with atomic_dir(out) as tmp:
            (tmp / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp / "scores.json").write_text(json.dumps(result, indent=1))
    return {**result, "predictions": rows}
