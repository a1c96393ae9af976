"""Factor (f) of the VL-T5 question: is it where VL-PET puts its modules in the DECODER?

In the quality study (bench/quality.py) every VL-PET variant ends its 1,000 steps at a training loss well above
VL-Adapter's and LoRA's, the four variants at the same level: whatever holds them back is shared by the four and not
in the encoder's gate. What they share is the paper's "lightweight" decoder: one parallel adapter on the value
projection of cross-attention, the decoder's layer norms frozen. VL-Adapter instead puts an adapter after every
decoder sub-layer and trains the decoder's norms.

This script swaps the two decoders, keeping everything else of a study run (backbone, data, features, lr, recipe,
steps, seed: the study run's own command, with only --rules and --out changed):

  vlpet_large+adapter_decoder   VL-PET-large's encoder, VL-Adapter's decoder
  vl_adapter+vlpet_decoder      VL-Adapter's encoder, VL-PET's decoder

If the decoder explains the gap, the first scores like VL-Adapter and the second like VL-PET-large.

    python bench/placement.py --study bench/out/quality-v2 --families t5 bart --seeds 0 1 2
    python bench/placement.py --study bench/out/quality-v2 --report-only
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (the study's helpers: one run, mean ± std)

SIDES = ("encoder", "decoder")
# hybrid name -> (method whose encoder design is kept, method whose decoder design is kept)
HYBRIDS = {"vlpet_large+adapter_decoder": ("vlpet_large", "vl_adapter"),
           "vl_adapter+vlpet_decoder": ("vl_adapter", "vlpet_large")}
REFERENCES = ("vlpet_large", "vl_adapter")


def _on_side(select: dict, side: str) -> dict | None:
    """``select`` narrowed to one stack, or None if it selects nothing there. A selector without ``stack`` (the
    visual projector's path) belongs to neither side and is left to the caller."""
    stacks = select["stack"] if isinstance(select["stack"], list) else [select["stack"]]
    if side not in stacks:
        return None
    return {**select, "stack": side}


def _named(side: str, name: str, sep: str) -> str:
    return name if name.startswith(side) else f"{side}{sep}{name}"


def hybrid_rules(encoder_set: dict, decoder_set: dict, name: str) -> dict:
    """One rule set: ``encoder_set``'s insertions and trainable selections on the encoder, ``decoder_set``'s on the
    decoder, and the selections naming no stack (the visual projector) once, from ``encoder_set``."""
    methods, rules, trainable = {}, [], []
    for side, src in (("encoder", encoder_set), ("decoder", decoder_set)):
        used = set()
        for r in src["rules"]:
            sel = _on_side(r["select"], side) if "stack" in r["select"] else None
            if sel is not None:
                rules.append({**copy.deepcopy(r), "name": _named(side, r["name"], "-"), "select": sel,
                              "insert": _named(side, r["insert"], "_")})
                used.add(r["insert"])
        methods.update({_named(side, m, "_"): copy.deepcopy(src["methods"][m]) for m in sorted(used)})
        for t in src.get("trainable", []):
            if "stack" in t["select"]:
                sel = _on_side(t["select"], side)
                if sel is not None:
                    trainable.append({**copy.deepcopy(t), "name": _named(side, t["name"], "-"), "select": sel})
            elif side == "encoder":
                trainable.append(copy.deepcopy(t))
    return {"name": name, "description": f"{encoder_set['name']} on the encoder, {decoder_set['name']} on the "
                                         "decoder (bench/placement.py)",
            "methods": methods, "rules": rules, "trainable": trainable}


# the options bench/quality.py writes into an adaptation run's command, each with one value: nothing else read from
# a command.txt is passed on (no --trust-code, no --text from elsewhere)
STUDY_OPTIONS = {"--out", "--init-from", "--rules", "--source", "--steps", "--seed", "--feature-cache", "--lr",
                 "--recipe", "--train-per-task", "--eval-per-task", "--eval-every"}


def study_rules(path: Path) -> dict:
    """A study's generated rule set as data, read through the project's rules loader first (size, aliases and
    schema checked), so a damaged or hostile file ends in one line."""
    import vlpet_fx

    try:
        return yaml.safe_load(vlpet_fx.load_rules(path).text)
    except vlpet_fx.VlpetError as exc:
        raise SystemExit(f"{exc}; rerun bench/quality.py for that study") from None


def command_for(study_run: Path, rules: Path, out: Path) -> list[str]:
    """The study run's own `vlpet-fx train` command with only --rules and --out replaced (and no --resume).
    A stored command with anything but `train` and `STUDY_OPTIONS` is refused in one line."""
    stored = study_run / "command.txt"
    try:
        args = q.train_args(shlex.split(stored.read_text()))
    except ValueError as exc:
        raise SystemExit(f"{stored}: not a command ({exc}); rerun that study run") from None
    pairs = args[1:]
    if args[:1] != ["train"] or len(pairs) % 2 or any(f not in STUDY_OPTIONS for f in pairs[::2]) \
            or not {"--rules", "--out"} <= set(pairs[::2]):
        bad = next((f for f in pairs[::2] if f not in STUDY_OPTIONS), "its form")
        raise SystemExit(f"{stored}: {bad} is not what bench/quality.py writes (a `vlpet-fx train` command with "
                         f"{', '.join(sorted(STUDY_OPTIONS))}); rerun that study run")
    given = dict(zip(pairs[::2], pairs[1::2]), **{"--rules": str(rules), "--out": str(out)})
    return q.cli() + ["train"] + [x for f, v in given.items() for x in (f, v)] + ["--save-every", str(q.SAVE_EVERY)]


def train_loss(run_dir: Path, last: int = 100) -> float:
    """Mean training loss over the run's last ``last`` steps (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r and "eval" not in r]
    end = max(s for s, _ in losses)
    return statistics.fmean(v for s, v in losses if s > end - last)


def summarise(study: Path, out: Path, families: list[str], seeds: list[int]) -> dict:
    results: dict = {}
    for fam in families:
        made: dict = {}  # every run of the family, references and hybrids: one backbone
        for method in (*REFERENCES, *HYBRIDS):
            base = (study / fam / method) if method in REFERENCES else (out / fam / method)
            runs = [base / f"seed{s}" for s in seeds if (base / f"seed{s}" / "report.json").exists()]
            if not runs:
                continue
            reps = [json.loads((r / "report.json").read_text()) for r in runs]
            made.update(zip(runs, reps))
            scores = q.task_scores(reps)
            results.setdefault(fam, {})[method] = {
                "seeds": [int(r.name[4:]) for r in runs], "average": scores.pop("average"), "tasks": scores,
                "train_loss_last100": q.mean_std([train_loss(r) for r in runs]),
                "trainable_percent": reps[0]["trainable_percent"]}
        q.one_backbone(made, f"{fam} (references in {study}, hybrids in {out})")
    return results


def markdown(results: dict) -> str:
    lines = ["| family | rule set | seeds | trainable % (of the patched model, image tower included) | VQA | GQA "
             "| NLVR | CIDEr | average | train loss (last 100) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fam, rows in results.items():
        for m, r in rows.items():
            n = len(r["seeds"])
            loss = q.mean_std_text(r["train_loss_last100"], n, digits=3)
            cells = [fam, m, str(n), f"{r['trainable_percent']:.2f}"]
            cells += [q.mean_std_text(r["tasks"][t], n) for t in q.TASKS] + [q.mean_std_text(r["average"], n), loss]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default="bench/out/quality-v2", help="a quality study's --out (its runs are reused)")
    ap.add_argument("--out", default=None, help="where the hybrid runs go (default: <study>/placement)")
    ap.add_argument("--families", nargs="+", default=["t5", "bart"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs {args.jobs}: give at least 1")
    study = Path(args.study)
    if not (study / "rules").is_dir():
        ap.error(f"--study {study}: not a quality study (no rules/ inside); run bench/quality.py first")
    out = Path(args.out) if args.out else study / "placement"
    t0 = time.perf_counter()
    if not args.report_only:
        jobs = []
        for s in args.seeds:
            for fam in args.families:
                for name, (enc, dec) in HYBRIDS.items():
                    ref = study / fam / dec / f"seed{s}"  # both references share the family's PET lr and command
                    if not (ref / "command.txt").exists():
                        raise SystemExit(f"{ref} has not finished: run the study first (bench/quality.py)")
                    sets = [study_rules(study / "rules" / fam / f"{m}.yaml") for m in (enc, dec)]
                    rules = out / "rules" / fam / f"{name}.yaml"
                    rules.parent.mkdir(parents=True, exist_ok=True)
                    rules.write_text(f"# bench/placement.py: {enc}'s encoder, {dec}'s decoder\n"
                                     + yaml.safe_dump(hybrid_rules(*sets, f"{name}_{fam}"), sort_keys=False))
                    rd = out / fam / name / f"seed{s}"
                    jobs.append((command_for(ref, rules, rd), rd))
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(q.run, c, rd, threads, True): rd for c, rd in jobs}
            for i, fut in enumerate(cf.as_completed(futs), 1):
                print(f"[{i}/{len(jobs)}] {futs[fut].relative_to(out)}  {fut.result():.0f} s", flush=True)
    results = summarise(study, out, args.families, args.seeds)
    meta = {"study": str(study), "families": args.families, "seeds": args.seeds, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "wall_s": round(time.perf_counter() - t0),
            "command": shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    md = markdown(results)
    (out / "results.md").write_text(md)
    print(md + f"wall clock {meta['wall_s']} s; {out / 'results.json'}")


if __name__ == "__main__":
    main()
