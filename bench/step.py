"""Training-step time and peak memory: full fine-tuning vs VL-PET-large (eager and graph back ends) vs the
same VL-PET modules inserted by hand (no compiler) vs PEFT LoRA at a similar trainable budget.

Timing: all variants live in one process and are timed in interleaved rounds (this machine is noisy); the
table gives medians and ratios to the hand-written reference. Memory: each variant runs again in its own
subprocess; on CPU the peak resident memory during 3 training steps above the resident model (Linux VmHWM after
a clear_refs reset), on CUDA torch's peak allocator statistics.

    python bench/step.py                        # t5-small shape, batch 8, source 64, target 16
    python bench/step.py --model t5 --size base --batch 8 --src 128 --tgt 32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import vlpet_fx  # noqa: E402
from vlpet_fx.passes.base import build_pet  # noqa: E402
from vlpet_fx.zoo import build_model  # noqa: E402

VARIANTS = ["full", "vlpet-eager", "vlpet-graph", "hand-reference", "peft-lora"]


class _Stash(nn.Module):
    """Hand-written: run the wrapped module after handing its input to the PET module."""

    def __init__(self, inner, pet):
        super().__init__()
        self.inner, self.pet = inner, pet

    def forward(self, hidden_states, *args, **kwargs):
        self.pet.block_input = hidden_states
        return self.inner(hidden_states, *args, **kwargs)


class _After(nn.Module):
    def __init__(self, inner, pet):
        super().__init__()
        self.inner, self.pet = inner, pet

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.pet.after(out[0]),) + out[1:]
        return self.pet.after(out)


class _Parallel(nn.Module):
    def __init__(self, inner, pet):
        super().__init__()
        self.inner, self.pet = inner, pet

    def forward(self, x):
        return self.pet.parallel(x, self.inner(x))


def hand_reference(base: nn.Module) -> nn.Module:
    """VL-PET-large on a T5 by hand: the plan's modules, placed with plain wrapper modules (no hooks)."""
    model = copy.deepcopy(base)
    plan = vlpet_fx.plan(model, "vlpet_large")
    model.requires_grad_(False)
    keep = [prm for n, prm in model.named_parameters() if n in plan.trainable]  # before wrapping renames them
    stashes = []
    for p in plan.placements:
        pet = build_pet(p)
        parent_path, _, child = p.site.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        inner = getattr(parent, child)
        setattr(parent, child, _After(inner, pet) if p.placement == "after" else _Parallel(inner, pet))
        if getattr(pet, "needs_block_input", False):
            stashes.append((p.site.input_path, pet))
    for path, pet in sorted(stashes, key=lambda t: -t[0].count(".")):  # innermost first: paths stay valid
        xp, _, xc = path.rpartition(".")
        xparent = model.get_submodule(xp) if xp else model
        setattr(xparent, xc, _Stash(getattr(xparent, xc), pet))
    for prm in keep:
        prm.requires_grad_(True)
    return model


def peft_lora(base: nn.Module, budget: int) -> nn.Module:
    import peft

    d = base.config.d_model
    n_targets = sum(1 for n, m in base.named_modules() if n.endswith((".q", ".v")) and isinstance(m, nn.Linear))
    rank = max(1, round(budget / (n_targets * 2 * d)))
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q", "v"], lora_dropout=0.0)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def make(variant: str, base: nn.Module, inputs: dict) -> nn.Module:
    if variant == "full":
        return copy.deepcopy(base).requires_grad_(True)
    if variant == "vlpet-eager":
        return vlpet_fx.patch(copy.deepcopy(base), "vlpet_large")
    if variant == "vlpet-graph":
        # the graph is captured at this batch's shapes (static shapes), with the model's own kwargs
        return vlpet_fx.patch(copy.deepcopy(base), "vlpet_large", backend="graph",
                              example_inputs=dict(inputs, use_cache=False))
    if variant == "hand-reference":
        return hand_reference(base)
    if variant == "peft-lora":
        budget = vlpet_fx.plan(base, "vlpet_large").trainable_params
        return peft_lora(base, budget)
    raise ValueError(variant)


def batch(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.src), generator=g)
    dec = torch.randint(3, vocab, (args.batch, args.tgt), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec)


def step_fn(model: nn.Module, inputs: dict, compile_: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    fwd = torch.compile(model) if compile_ else model
    if isinstance(model, torch.fx.GraphModule):
        inputs = dict(inputs, use_cache=False)

    def step():
        out = fwd(**inputs)
        logits = out.logits if hasattr(out, "logits") else out["logits"]
        loss = logits.float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def base_model(args) -> nn.Module:
    m = build_model(args.model, args.size)
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0  # the graph back end is captured in eval mode; keep all variants comparable
    return m.train()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_memory(args, variant: str) -> None:
    base = base_model(args)
    inputs = batch(args, base.config.vocab_size)
    model = make(variant, base, inputs)
    del base
    step, _ = step_fn(model, inputs, args.compile)
    if torch.cuda.is_available():
        for _ in range(3):
            step()
        print(json.dumps({"peak_mb": torch.cuda.max_memory_allocated() / 2**20}))
        return
    # CPU: reset the kernel's high-water mark (Linux clear_refs 5), then peak RSS above the resident model
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    for _ in range(3):  # includes the first step, which allocates the optimizer state
        step()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - before) / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="t5")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=64)
    ap.add_argument("--tgt", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=VARIANTS)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_of:
        run_memory(args, args.memory_of)
        return

    base = base_model(args)
    inputs = batch(args, base.config.vocab_size)
    steps, trainable = {}, {}
    for v in args.variants:
        steps[v], trainable[v] = step_fn(make(v, base, inputs), inputs, args.compile)
        steps[v]()  # warm-up
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    mem = {}
    for v in args.variants:
        cmd = [sys.executable, __file__, "--memory-of", v, "--model", args.model, "--size", args.size,
               "--batch", str(args.batch), "--src", str(args.src), "--tgt", str(args.tgt)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        mem[v] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}

    from rich.console import Console
    from rich.table import Table

    ref = "hand-reference" if "hand-reference" in times else args.variants[0]
    med = {v: statistics.median(ts) for v, ts in times.items()}
    t = Table(title=f"{args.model}-{args.size}: batch {args.batch}, source {args.src}, target {args.tgt}; "
                    f"median of {args.rounds} interleaved rounds; torch {torch.__version__}, {os.cpu_count()} cores")
    for col in ("variant", "trainable", "step (s)", f"÷ {ref}", "peak train mem (MB)", "÷ full"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for v in args.variants:
        pk = mem[v].get("peak_mb")
        full_pk = mem.get("full", {}).get("peak_mb")
        t.add_row(v, f"{trainable[v]:,}", f"{med[v]:.3f}", f"{med[v] / med[ref]:.3f}",
                  f"{pk:.0f}" if pk else "-", f"{pk / full_pk:.2f}" if pk and full_pk else "-")
    Console().print(t)


if __name__ == "__main__":
    main()
