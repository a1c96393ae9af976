"""The VL-T5 question: why do the VL-PET variants trail LoRA and VL-Adapter on the small VL-T5 of the quality
study? A controlled ablation on the quality study's protocol (bench/quality.py), 3 seeds per condition.

Every condition changes ONE factor of the study's VL-T5 VL-PET-large run (widths scaled by 128/768, zero-initialised
up projection and gate, so G = 0.5 at the start; output scale 0.3; 1,000 adaptation steps; a backbone trained
2,500 steps on the MNIST tasks) and is read against LoRA under the same backbone and budget:

  base           the study's VL-PET-large (T5 variant) — and LoRA, VL-Adapter as the references
  gate-start     (a) G starts near 1 (gate_start 0.95) instead of 0.5
  scale-1        (b) output scale 1.0 instead of 0.3
  budget-3x      (c) 3,000 adaptation steps instead of 1,000 (VL-PET and LoRA)
  backbone-3x    (d) a backbone trained 3x longer (7,500 steps) (VL-PET and LoRA)
  paper-recipe   (e) the paper's T5 recipe (--recipe paper: lr 3e-4, decay grouping by name, warm-up,
                 clip, eps, dropout), when the installed `vlpet-fx train` has it (VL-PET and LoRA)

The gap of a condition is (VL-PET − LoRA) under that condition; a factor explains the study's gap if moving it
closes the gap beyond the seeds' spread. Runs are `vlpet-fx train` processes (resumable, like the study).

    python bench/ablation.py                      # everything, 3 seeds (about an hour on 2 CPU cores)
    python bench/ablation.py --quick              # 1 seed, short runs: checks the pipeline in minutes
    python bench/ablation.py --report-only
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (the study's helpers: rule scaling, text model, one run)

FAMILY = "t5"
# condition -> (method, changes); changes: gate_start, scale, steps factor, backbone factor, recipe
CONDITIONS: dict[str, list[tuple[str, dict]]] = {
    "base": [("vlpet_large", {}), ("lora", {}), ("vl_adapter", {})],
    "gate-start": [("vlpet_large", {"gate_start": 0.95})],
    "scale-1": [("vlpet_large", {"scale": 1.0})],
    "budget-3x": [("vlpet_large", {"steps": 3}), ("lora", {"steps": 3})],
    "backbone-3x": [("vlpet_large", {"backbone": 3}), ("lora", {"backbone": 3})],
    "paper-recipe": [("vlpet_large", {"recipe": "paper"}), ("lora", {"recipe": "paper"})],
}


def has_recipe() -> bool:
    out = subprocess.run(q.cli() + ["train", "--help"], capture_output=True, text=True).stdout
    return "--recipe" in out


def rules_for(method: str, change: dict, out: Path) -> Path:
    path = q.scale_rules(method, FAMILY, q.TEXT_SHAPES[FAMILY]["d_model"], out, change.get("scale"))
    if "gate_start" in change:
        data = yaml.safe_load(path.read_text())
        for cfg in data["methods"].values():
            if cfg.get("type") == "vlpet" and cfg.get("gate", "none") != "none":
                cfg["gate_start"] = change["gate_start"]
        data["name"] += f"_start{change['gate_start']:g}"
        path.write_text(f"# bench/ablation.py: {method}, gate_start {change['gate_start']:g}\n"
                        + yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/ablation")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    ap.add_argument("--backbone-steps", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--train-per-task", type=int, default=2000)
    ap.add_argument("--eval-per-task", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--backbones", default=None, help="directory with backbone-t5/ of the study (reused if there)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.backbone_steps, args.steps = args.seeds[:1], 200, 60
        args.train_per_task, args.eval_per_task = 200, 20
        if args.out == ap.get_default("out"):
            args.out = "bench/out/ablation-quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bb = Path(args.backbones) if args.backbones else out
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    recipe_ok = has_recipe()
    conditions = [c for c in args.conditions if c != "paper-recipe" or recipe_ok]
    common = ["--train-per-task", str(args.train_per_task), "--eval-per-task", str(args.eval_per_task),
              "--save-every", "0", "--eval-every", "0"]
    t0 = time.perf_counter()
    runs: list[tuple[str, str, int, Path, list[str]]] = []
    if not args.report_only:
        text = q.make_text_model(FAMILY, bb / f"text-{FAMILY}")
        factors = sorted({ch.get("backbone", 1) for c in conditions for _, ch in CONDITIONS[c]})
        jobs = []
        for f in factors:
            name = f"backbone-{FAMILY}" if f == 1 else f"backbone-{FAMILY}-x{f}"
            cmd = q.cli() + ["train", "--out", str(bb / name), "--text", str(text), "--rules", "full_finetune",
                             "--source", "mnist", "--steps", str(args.backbone_steps * f), "--tokens-per-image",
                             "1", "--seed", "0", "--lr", str(args.lr)] + common
            jobs.append((cmd, bb / name))
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda j: q.run(j[0], j[1], threads), jobs))
        for s in args.seeds:
            for c in conditions:
                for method, ch in CONDITIONS[c]:
                    f = ch.get("backbone", 1)
                    backbone = bb / (f"backbone-{FAMILY}" if f == 1 else f"backbone-{FAMILY}-x{f}")
                    rules = rules_for(method, ch, out / "rules" / c / f"{method}.yaml")
                    rd = out / c / method / f"seed{s}"
                    cmd = q.cli() + ["train", "--out", str(rd), "--init-from", str(backbone), "--rules", str(rules),
                                     "--source", "fashion-mnist", "--steps", str(args.steps * ch.get("steps", 1)),
                                     "--seed", str(s)] + common
                    cmd += ["--recipe", ch["recipe"]] if "recipe" in ch else ["--lr", str(args.lr)]
                    runs.append((c, method, s, rd, cmd))
        done = 0
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(q.run, cmd, rd, threads): rd for *_, rd, cmd in runs}
            for fut in cf.as_completed(futs):
                secs = fut.result()
                done += 1
                print(f"[{done}/{len(runs)}] {futs[fut].relative_to(out)}  {secs:.0f} s", flush=True)

    results: dict = {}
    for c in conditions:
        for method, _ in CONDITIONS[c]:
            reps = [json.loads(p.read_text()) for s in args.seeds
                    if (p := out / c / method / f"seed{s}" / "report.json").exists()]
            if not reps:
                continue
            avgs = [statistics.fmean(r["main"][t] for t in q.TASKS) for r in reps]
            results.setdefault(c, {})[method] = {"seeds": len(reps), "averages": avgs,
                                                 "mean_std": q.mean_std(avgs)}
    base_lora = results.get("base", {}).get("lora")
    def fmt(r: dict) -> str:  # mean ± std over the seeds that finished (no spread from one seed)
        return q.mean_std_text(r["mean_std"], r["seeds"])

    lines = ["| condition | VL-PET-large avg | LoRA avg (same backbone and budget) | gap VL-PET − LoRA | seeds "
             "(VL-PET / LoRA) |", "|---|---:|---:|---:|---:|"]
    for c, rows in results.items():
        v = rows.get("vlpet_large")
        ref = rows.get("lora") or base_lora
        if v is None or ref is None:
            continue
        gap = v["mean_std"][0] - ref["mean_std"][0]
        spread = (v["mean_std"][1] ** 2 + ref["mean_std"][1] ** 2) ** 0.5
        both = v["seeds"] > 1 and ref["seeds"] > 1
        lines.append(f"| {c} | {fmt(v)} | {fmt(ref)}{'' if 'lora' in rows else ' (base)'} | {gap:+.1f}"
                     f"{f' ± {spread:.1f}' if both else ''} | {v['seeds']} / {ref['seeds']} |")
    meta = {"family": FAMILY, "seeds": args.seeds, "steps": args.steps, "backbone_steps": args.backbone_steps,
            "train_per_task": args.train_per_task, "eval_per_task": args.eval_per_task, "lr": args.lr,
            "recipe_condition": recipe_ok, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.perf_counter() - t0),
            "command": shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wall clock {meta['wall_s']} s; {out / 'results.json'}")


if __name__ == "__main__":
    main()
