"""Compiler scaling: capture + discovery + plan time against model depth and width, for every family.

Two measurements, both on the meta device (shapes only, no weights: torch.export traces with fake tensors
anyway, so the compiler's cost does not depend on the weights and the large shapes need no memory):

1. Sizes: every built-in family of the discovery table at tiny → small → base → large shapes. Per model, the
   stages of the full path, timed apart (capture = torch.export of the whole model; analysis = the dataflow
   discovery of the sites; plan = resolving a rule set against the site table) and the fast path that
   `inspect`/`patch` use (capture one layer of each structural kind, replicate its sites), whose table a
   check here compares to the full one.
2. Depth and width sweeps on T5 and BART: layers 2 … 48 at a fixed width, width 256 … 2048 at fixed depth.

Medians over --repeats runs. Prints rich tables; --json writes the figures, --plot a PNG.

    python bench/capture.py                                  # everything (about 10 minutes on 2 cores)
    python bench/capture.py --quick                          # tiny/small/base of 4 families + short sweeps
    python bench/capture.py --families t5 bart --sizes base --repeats 5
    python bench/capture.py --lm                             # causal LMs / VLMs at published shapes (Llama-2-7B ...)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import vlpet_fx  # noqa: E402
from vlpet_fx.zoo import build_model, list_models  # noqa: E402

# every built-in model except the composite VL ones (their parts are in the list)
FAMILIES = [e.name for e in list_models() if not e.name.startswith("vl-")]
RULES = "vl_adapter"  # adapters after every attention and FFN sub-layer: matches encoder-only towers as well


def median_time(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def measure(model, repeats: int, full: bool = True) -> dict:
    params = sum(p.numel() for p in model.parameters())
    fast_s, table = median_time(lambda: vlpet_fx.discover(model, fast=True), repeats)
    row = dict(params=params, sites=len(table), layers=table.num_layers(), fast_s=fast_s)
    if full:
        cap_s, cap = median_time(lambda: vlpet_fx.capture(model), repeats)
        ana_s, full_table = median_time(lambda: vlpet_fx.discover(model, captured=cap), repeats)
        assert [s.public() for s in full_table] == [s.public() for s in table], "fast table != full table"
        row.update(capture_s=cap_s, analysis_s=ana_s, nodes=len(cap.exported.graph.nodes))
    try:
        rules = vlpet_fx.load_rules(RULES)
        plan_s, the_plan = median_time(lambda: vlpet_fx.plan(model, rules, table=table), repeats)
        row.update(plan_s=plan_s, placements=len(the_plan.placements))
    except vlpet_fx.VlpetError as exc:  # e.g. a tower whose blocks the rule set does not name
        row.update(plan_s=None, plan_error=str(exc)[:80])
    return row


def sweep_model(family: str, layers: int, width: int):
    """A T5- or BART-shaped model with `layers` encoder and decoder layers and width `width` (meta device)."""
    heads = max(1, width // 64)
    if family == "t5":
        cfg = tf.T5Config(d_model=width, d_ff=4 * width, d_kv=64, num_heads=heads, num_layers=layers,
                          num_decoder_layers=layers, vocab_size=32128, decoder_start_token_id=0, pad_token_id=0)
        cls = tf.T5ForConditionalGeneration
    else:
        cfg = tf.BartConfig(d_model=width, encoder_ffn_dim=4 * width, decoder_ffn_dim=4 * width,
                            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_layers=layers,
                            decoder_layers=layers, vocab_size=50265, max_position_embeddings=1024)
        cls = tf.BartForConditionalGeneration
    with torch.device("meta"):
        return cls(cfg).eval()


# causal LMs and VLMs at their published shapes (meta device: no weights are allocated)
LM_SHAPES = {
    "llama-2-7b": ("LlamaConfig", "AutoModelForCausalLM",
                   dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)),
    "mistral-7b": ("MistralConfig", "AutoModelForCausalLM",
                   dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=32000)),
    "gpt2": ("GPT2Config", "AutoModelForCausalLM", dict()),
    "qwen2-0.5b": ("Qwen2Config", "AutoModelForCausalLM",
                   dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, vocab_size=151936)),
    "llava-1.5-7b": ("LlavaConfig", "AutoModelForImageTextToText",
                     dict(text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                                           num_hidden_layers=32, num_attention_heads=32, vocab_size=32064),
                          vision_config=dict(model_type="clip_vision_model", hidden_size=1024,
                                             intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                             image_size=336, patch_size=14, projection_dim=768),
                          image_token_index=32000, image_seq_length=576)),
}
LM_RULES = "vlpet_causal_lm"


def lm_model(name: str):
    config_cls, auto, kwargs = LM_SHAPES[name]
    cfg = getattr(tf, config_cls)(**kwargs)
    with torch.device("meta"):
        return getattr(tf, auto).from_config(cfg).eval()


def measure_lm(name: str, repeats: int, full: bool) -> dict:
    model = lm_model(name)
    fast_s, table = median_time(lambda: vlpet_fx.discover(model, fast=True), repeats)
    row = dict(model=name, params=sum(p.numel() for p in model.parameters()), sites=len(table),
               layers=table.num_layers(), fast_s=fast_s, full_s=None)
    plan_s, the_plan = median_time(lambda: vlpet_fx.plan(model, LM_RULES, table=table), repeats)
    row.update(plan_s=plan_s, placements=len(the_plan.placements), trainable=the_plan.trainable_params)
    if full:
        full_s, full_table = median_time(lambda: vlpet_fx.discover(model, fast=False), 1)
        row.update(full_s=full_s, same_table=[s.public() for s in full_table] == [s.public() for s in table])
    return row


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def plot(rows: list[dict], sweeps: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for fam in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == fam and r.get("capture_s") is not None]
        if rs:
            ax.plot([r["params"] / 1e6 for r in rs], [r["capture_s"] + r["analysis_s"] for r in rs], "o-",
                    label=fam, ms=4)
    ax.set_xscale("log"), ax.set_yscale("log")
    ax.set_xlabel("parameters (M)"), ax.set_ylabel("full capture + analysis (s)")
    ax.set_title("every family, tiny → large"), ax.legend(fontsize=7, ncol=2), ax.grid(alpha=0.3)
    for ax, axis, label in ((axes[1], "depth", "layers per stack (width 768)"),
                            (axes[2], "width", "width d_model (6 + 6 layers)")):
        for fam in dict.fromkeys(s["family"] for s in sweeps):
            ss = [s for s in sweeps if s["family"] == fam and s["axis"] == axis]
            x = [s[axis] for s in ss]
            ax.plot(x, [s["capture_s"] for s in ss], "o-", label=f"{fam}: capture (torch.export)")
            ax.plot(x, [s["analysis_s"] for s in ss], "s--", label=f"{fam}: analysis")
            ax.plot(x, [s["fast_s"] for s in ss], "^:", label=f"{fam}: fast path (all stages)")
            ax.plot(x, [s["plan_s"] for s in ss], "x-.", label=f"{fam}: plan", alpha=0.6)
        ax.set_xlabel(label), ax.set_ylabel("seconds"), ax.grid(alpha=0.3), ax.legend(fontsize=7)
        ax.set_title(f"{axis} sweep")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "base", "large"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--depths", nargs="+", type=int, default=[2, 6, 12, 24, 48])
    ap.add_argument("--widths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--sweep-families", nargs="+", default=["t5", "bart"])
    ap.add_argument("--quick", action="store_true", help="4 families up to base, short sweeps, 1 repeat")
    ap.add_argument("--lm", nargs="*", default=None, metavar="NAME",
                    help=f"only the causal-LM/VLM shapes ({', '.join(LM_SHAPES)}; none given: all) on the meta device")
    ap.add_argument("--lm-full", action="store_true", help="with --lm: also time one full (unreduced) capture")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--plot", default=None, help="write a PNG here")
    args = ap.parse_args()
    if args.quick:
        args.families = [f for f in args.families if f in ("t5", "bart", "torch-transformer", "clip-vit-b-32")]
        args.sizes = [s for s in args.sizes if s != "large"]
        args.depths, args.widths, args.repeats = [2, 6, 12], [256, 768], 1
    logging.getLogger().setLevel(logging.ERROR)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    console = Console(width=200)
    entries = {e.name: e for e in list_models()}

    vlpet_fx.discover(build_model("t5", "tiny", device="meta"))  # warm-up: imports and torch.export's first call
    if args.lm is not None:
        names = args.lm or list(LM_SHAPES)
        lm_rows = []
        t = Table(title=f"causal LMs / VLMs, meta device, fast path (discover) + plan ({LM_RULES}), median of "
                        f"{args.repeats}; {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
        for col in ("model", "params", "layers", "sites", "fast path (s)", "plan (s)", "fast + plan (s)",
                    "placements", "trainable", "full capture+analysis (s)"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for name in names:
            r = measure_lm(name, args.repeats, args.lm_full)
            lm_rows.append(r)
            t.add_row(name, f"{r['params'] / 1e9:.2f} B", ", ".join(f"{k} {v}" for k, v in r["layers"].items()),
                      str(r["sites"]), f"{r['fast_s']:.2f}", f"{r['plan_s']:.2f}", f"{r['fast_s'] + r['plan_s']:.2f}",
                      str(r["placements"]), f"{r['trainable']:,}", fmt(r["full_s"]))
        console.print(t)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"lm_rows": lm_rows, "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
                           "transformers": tf.__version__}, fh, indent=1)
        return
    rows = []
    for fam in args.families:
        seen_params = set()
        for size in args.sizes:
            if size not in entries[fam].sizes:
                continue
            model = build_model(fam, size, device="meta")
            params = sum(p.numel() for p in model.parameters())
            if params in seen_params:  # e.g. the open_clip towers: small and base are the same architecture
                continue
            seen_params.add(params)
            rows.append(dict(model=fam, size=size, **measure(model, args.repeats)))
            console.print(f"  {fam}-{size}: {rows[-1]['params'] / 1e6:.1f} M params, "
                          f"full {rows[-1]['capture_s'] + rows[-1]['analysis_s']:.2f} s, fast {rows[-1]['fast_s']:.2f} s")

    sweeps = []
    for fam in args.sweep_families:
        for layers in args.depths:
            sweeps.append(dict(family=fam, axis="depth", depth=layers, width=768,
                               **measure(sweep_model(fam, layers, 768), args.repeats)))
        for width in args.widths:
            sweeps.append(dict(family=fam, axis="width", depth=6, width=width,
                               **measure(sweep_model(fam, 6, width), args.repeats)))

    t = Table(title=f"capture + discovery + plan ({RULES}), meta device, median of {args.repeats}; "
                    f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    for col in ("model", "size", "params", "graph nodes", "sites", "capture (s)", "analysis (s)", "plan (s)",
                "full total (s)", "fast path (s)", "full ÷ fast"):
        t.add_column(col, justify="left" if col in ("model", "size") else "right")
    for r in rows:
        full = r["capture_s"] + r["analysis_s"] + (r["plan_s"] or 0)
        fast = r["fast_s"] + (r["plan_s"] or 0)
        t.add_row(r["model"], r["size"], f"{r['params'] / 1e6:.1f} M", str(r["nodes"]), str(r["sites"]),
                  fmt(r["capture_s"]), fmt(r["analysis_s"]), fmt(r["plan_s"], ".3f"), f"{full:.2f}", f"{fast:.2f}",
                  f"{full / fast:.1f}x")
    console.print(t)
    if sweeps:
        t = Table(title="depth and width sweeps (T5/BART shapes, meta device)")
        for col in ("family", "layers", "width", "params", "graph nodes", "capture (s)", "analysis (s)", "plan (s)",
                    "fast path (s)", "s per layer (full)"):
            t.add_column(col, justify="left" if col == "family" else "right")
        for s in sweeps:
            t.add_row(s["family"], str(s["depth"]), str(s["width"]), f"{s['params'] / 1e6:.0f} M", str(s["nodes"]),
                      fmt(s["capture_s"]), fmt(s["analysis_s"]), fmt(s["plan_s"], ".3f"), fmt(s["fast_s"]),
                      f"{(s['capture_s'] + s['analysis_s']) / (2 * s['depth']):.3f}")
        console.print(t)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "sweeps": sweeps, "date": time.strftime("%Y-%m-%d"),
                       "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}, fh,
                      indent=1)
    if args.plot:
        plot(rows, sweeps, args.plot)
        console.print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
