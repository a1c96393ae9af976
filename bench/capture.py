"""Capture + discovery time for built-in models at several sizes (issue: compiler speed).

Each model is built with real (random) weights on the CPU, then timed: the fast path (capture one layer of
each structural kind, replicate the sites) and, side by side in the same run, the full capture of every layer.
Medians over --repeats runs. Prints a rich table; --json writes the figures.

    python bench/capture.py                      # t5 and bart, tiny/small/base, 3 repeats
    python bench/capture.py --models t5 --sizes base --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import vlpet_fx  # noqa: E402
from vlpet_fx.zoo import build_model  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["t5", "bart"])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "small", "base"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-full", action="store_true", help="skip the full (every layer) capture")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    console = Console()
    for name in args.models:
        for size in args.sizes:
            model = build_model(name, size)
            params = sum(p.numel() for p in model.parameters())
            fast_s, table = timed(lambda: vlpet_fx.discover(model, fast=True), args.repeats)
            full_s = None
            if not args.no_full:
                full_s, full = timed(lambda: vlpet_fx.discover(model, fast=False), args.repeats)
                assert [s.public() for s in full] == [s.public() for s in table], f"{name}-{size}: fast != full"
            rows.append(dict(model=name, size=size, params=params, sites=len(table), layers=table.num_layers(),
                             fast_s=fast_s, full_s=full_s))

    t = Table(title=f"capture + discovery, median of {args.repeats} ({platform.machine()}, "
                    f"{os.cpu_count()} cores, torch {torch.__version__})")
    for col in ("model", "size", "params", "sites", "fast (s)", "full (s)", "full / fast"):
        t.add_column(col, justify="right" if col not in ("model", "size") else "left")
    for r in rows:
        ratio = f"{r['full_s'] / r['fast_s']:.1f}x" if r["full_s"] else "-"
        t.add_row(r["model"], r["size"], f"{r['params'] / 1e6:.1f} M", str(r["sites"]), f"{r['fast_s']:.2f}",
                  f"{r['full_s']:.2f}" if r["full_s"] else "-", ratio)
    console.print(t)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
