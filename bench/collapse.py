"""Does a trained VL backbone's text encoder still tell its positions apart, and does its decoder read the task?

Found on the pretrained quality study: VL-BERT2BERT trained in full at 1e-3 (the paper's PET lr, which the `paper`
recipe then gave full fine-tuning too) answered "true" to every captioning prompt under beam search. Its encoder
had collapsed: every position of an example gave the same vector, so the decoder could read how many images an
example has, not its question. The authors fine-tune in full at 1e-4 (`full_finetuning.sh`).

For each finished run directory (a `vlpet-fx train --out`), on its backbone's validation tasks (the MNIST digits):

* `position cos`: the mean cosine between the encoder outputs of two different positions of one example
  (text and visual tokens, padding left out), averaged over examples; 1.0 is a collapsed encoder;
* per task, the probability mass of the first answer token that lies on the *other* tasks' answers' first tokens
  (`off-task mass`: how much the decoder ignores the prompt; 0 when it reads it).

    python bench/collapse.py RUN_DIR [RUN_DIR ...] [--json docs/bench/collapse.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

TASKS = ("vqa", "gqa", "nlvr", "caption")


def validation_examples(n: int = 50, source: str = "mnist") -> dict:
    from vlpet_fx.data.tasks import build_task

    return {t: build_task(t, "val", n, source=source, seed=0) for t in TASKS}


def measure_model(model, tok, examples: dict, cache: str | None = None) -> dict:
    """`position_cos` and each task's `off_task_mass` (see the module's docstring) of a VL model and its tokenizer
    on `examples` (task -> examples)."""
    from vlpet_fx.train.health import position_cosine
    from vlpet_fx.train.batching import example_features, pad_visual, task_prompt, tokenize
    from vlpet_fx.vl import FeatureCache

    model.eval()
    feats = FeatureCache(model, cache)
    firsts: dict[str, set[int]] = {}
    batches = {}
    for task, ex in examples.items():
        f, vmask = pad_visual(example_features(feats, ex), "cpu")
        ids, mask = tokenize(tok, [task_prompt(e.task, e.input) for e in ex], "cpu")
        labels, _ = tokenize(tok, [e.target for e in ex], "cpu")
        # the first answer token: after the tokenizer's own start token if it adds one (BERT's [CLS])
        start = int(bool((labels[:, 0] == labels[0, 0]).all()) and int(labels[0, 0]) in tok.all_special_ids)
        firsts[task] = {int(i) for i in labels[:, start]}
        batches[task] = (ids, mask, f, vmask, labels.masked_fill(labels == tok.pad_token_id, -100), start)
    out: dict = {"tasks": {}}
    cosines = []
    for task, (ids, mask, f, vmask, labels, start) in batches.items():
        inputs = dict(input_ids=ids, attention_mask=mask, visual_features=f, visual_mask=vmask)
        cosines.append(position_cosine(model, inputs))
        with torch.no_grad():
            logits = model(**inputs, labels=labels).logits
        p = logits[:, start].float().softmax(-1).mean(0)
        others = sorted(set().union(*(firsts[t] for t in examples if t != task)) - firsts[task])
        out["tasks"][task] = {"off_task_mass": round(float(p[others].sum()), 4)}
    out["position_cos"] = round(sum(cosines) / len(cosines), 4)
    return out


def measure(run: Path, n: int = 50, source: str = "mnist", cache: str | None = None) -> dict:
    """The measurements of a finished `vlpet-fx train` run directory, with its lr and steps."""
    from vlpet_fx.train.batching import task_prompt
    from vlpet_fx.train.loop import load_backbone, read_run_record

    examples = validation_examples(n, source)
    texts = [task_prompt(e.task, e.input) for ex in examples.values() for e in ex] + \
        [e.target for ex in examples.values() for e in ex]
    model, tok, _ = load_backbone(run, texts)
    record = read_run_record(run / "run.json")
    return {"run": str(run), "lr": record.get("resolved", {}).get("lr"), "steps": record.get("steps"),
            **measure_model(model, tok, examples, cache)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=50, help="validation examples per task")
    ap.add_argument("--feature-cache", default=None, help="the runs' feature cache directory (faster)")
    ap.add_argument("--json", type=Path, default=None, help="write the measurements here")
    args = ap.parse_args()
    if not 1 <= args.n <= 10_000:
        ap.error(f"--n {args.n}: give 1..10000 examples per task")
    from vlpet_fx.errors import VlpetError

    try:
        rows = [measure(r, args.n, cache=args.feature_cache) for r in args.runs]
    except VlpetError as exc:
        ap.exit(2, f"error: {exc}\n")
    for r in rows:
        off = " ".join(f"{t} {v['off_task_mass']:.2f}" for t, v in r["tasks"].items())
        print(f"{r['run']}: lr {r['lr']}, {r['steps']} steps, position cos {r['position_cos']:.3f}, "
              f"off-task mass {off}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
