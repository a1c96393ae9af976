"""Matrix-product rate on this machine: the products of PET modules next to a large square one.

Tells whether a PET module's products already run at the machine's peak (then only less arithmetic can make
a step faster). Median of 7 timed repeats per shape, after a warm-up.

    python bench/matmul.py                               # t5-small and t5-base VL-PET shapes, 2048^3
    python bench/matmul.py --shapes 512x512x96 4096x4096x4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

# M x K x N: t5-small VL-PET down projection (512 tokens, d 512, r 96), its up projection, t5-base's
# (1024 tokens, d 768, r 192), and a large square product for the machine's peak
SHAPES = ["512x512x96", "512x96x512", "1024x768x192", "2048x2048x2048"]


def rate(m: int, k: int, n: int, budget_s: float = 0.2) -> tuple[float, float]:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    a @ b
    reps = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        times.append((time.perf_counter() - t0) / reps)
    t = statistics.median(times)
    return t, 2 * m * k * n / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="MxKxN products to time")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for shape in args.shapes:
        m, k, n = (int(x) for x in shape.split("x"))
        t, gflops = rate(m, k, n)
        print(f"{shape:>16}: {t * 1e6:9.0f} us  {gflops:6.0f} GFLOP/s")


if __name__ == "__main__":
    main()
