"""Training-step time and peak memory of every way to fine-tune a model: full fine-tuning, any rule set
through the eager and the graph back end, with and without torch.compile, the same PET modules inserted by
hand (no compiler) and PEFT LoRA at an equal trainable budget.

A variant is written ``KIND[/RULES][+compile]``:

    full                      every parameter trains (the unpatched model)
    eager/vlpet_large         vlpet_fx.patch(model, "vlpet_large")            (eager back end)
    graph/vlpet_large         vlpet_fx.patch(..., backend="graph")             (graph back end, static shapes)
    hand/vlpet_large          the same method written into T5/BART by hand (bench/hand.py: its own modules and
                              layer forwards, no compiler); checked against eager/vlpet_large at set-up
    peft-lora/vlpet_large     PEFT LoRA on q and v, rank chosen so the trainable count equals the rule set's
    peft-lora-sites/vlpet_large  PEFT LoRA on the Linear that produces each of the rule set's sites (attention
                              output o, FFN wo, cross-attention v), rank for the same trainable count
    eager/lora-peft           our `lora` method on PEFT's sites and rank (the compiler against PEFT itself)
    ...+compile               the same, run through torch.compile (inductor)

Timing: all variants live in one process and are timed in interleaved rounds (this machine is noisy); the
table gives medians and ratios to the reference variant (--ref). Memory: each variant runs again in its own
subprocess; on CPU the peak resident memory during 3 training steps above the resident model (Linux VmHWM after
a clear_refs reset), on CUDA torch's peak allocator statistics. ``--memory-of V`` measures one variant in the
calling process; with ``--inference`` it measures 3 forwards without autograd instead (evaluation, generation).

    python bench/step.py                        # t5-small shape, batch 8, source 64, target 16, issue 3's set
    python bench/step.py --model t5 --size base --batch 8 --src 128 --tgt 32 --variants full eager/vlpet_large_t5
    python bench/step.py --variants full eager/vlpet_large graph/vlpet_large+compile --json out.json
    python bench/step.py --flops --variants eager/vlpet_large peft-lora/vlpet_large peft-lora-sites/vlpet_large

``--flops`` adds the floating-point operations of one forward + backward per variant (torch.utils.flop_counter:
matrix products only) and the time per GFLOP, to tell arithmetic from implementation speed.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

import vlpet_fx  # noqa: E402
from vlpet_fx.zoo import build_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hand import hand_reference, pet_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VARIANTS = ["full", "eager/vlpet_large", "graph/vlpet_large", "hand/vlpet_large", "peft-lora/vlpet_large",
            "eager/lora-peft"]


def qv_targets(base: nn.Module) -> list[str]:
    """The q and v projections of every attention, by the names PEFT matches (T5: q/v; BART: q_proj/v_proj)."""
    names = [n for n, m in base.named_modules() if isinstance(m, nn.Linear)]
    for q, v in (("q", "v"), ("q_proj", "v_proj")):
        if any(n.endswith("." + q) for n in names):
            return [q, v]
    raise SystemExit("peft-lora: the model has no q/v (or q_proj/v_proj) projections")


def lora_rank(base: nn.Module, budget: int) -> int:
    d = base.config.d_model
    targets = tuple("." + t for t in qv_targets(base))
    n_targets = sum(1 for n, m in base.named_modules() if n.endswith(targets) and isinstance(m, nn.Linear))
    return max(1, round(budget / (n_targets * 2 * d)))


def site_targets(base: nn.Module, plan) -> list[str]:
    """The Linear that produces each site of a plan: the site itself if it is a Linear, else the last Linear
    inside it (T5: SelfAttention -> o, DenseReluDense -> wo; BART: self_attn -> out_proj)."""
    targets = []
    for p in plan.placements:
        mod = base.get_submodule(p.site.path)
        linears = [n for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise SystemExit(f"peft-lora-sites: site {p.site.path} has no Linear to put LoRA on")
        targets.append(p.site.path if linears[-1] == "" else f"{p.site.path}.{linears[-1]}")
    return sorted(set(targets))


def peft_lora(base: nn.Module, rank: int, targets: list[str] | None = None) -> nn.Module:
    import peft

    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets or qv_targets(base), lora_dropout=0.0)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


@functools.lru_cache(maxsize=None)
def lora_as_peft(rank: int) -> str:
    """Our `lora` rule set on PEFT's sites and settings (q and v of every attention, rank, alpha 2r, no
    dropout, biases frozen), written to a temporary YAML file."""
    data = {"name": "lora_peft", "methods": {"lora": {"type": "lora", "rank": rank, "alpha": 2 * rank, "dropout": 0.0}},
            "rules": [{"name": "attention-qv", "insert": "lora", "placement": "parallel",
                       "select": {"stack": ["encoder", "decoder"], "block": ["self_attn", "cross_attn"],
                                  "role": ["q", "v"]}}]}
    fd, path = tempfile.mkstemp(suffix=".yaml", prefix="lora_peft_")
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(data, fh)
    atexit.register(os.unlink, path)
    return path


def parse(variant: str) -> tuple[str, str | None, bool]:
    compile_ = variant.endswith("+compile")
    body = variant.removesuffix("+compile")
    kind, _, rules = body.partition("/")
    if kind not in ("full", "eager", "graph", "hand", "peft-lora", "peft-lora-sites") or (kind != "full" and not rules):
        raise SystemExit(f"bad variant '{variant}': use full, eager/RULES, graph/RULES, hand/RULES, peft-lora/RULES "
                         "or peft-lora-sites/RULES, optionally +compile")
    return kind, rules or None, compile_


def make(variant: str, base: nn.Module, inputs: dict, budget_rules: str) -> nn.Module:
    kind, rules, _ = parse(variant)
    if rules == "lora-peft":
        rules = lora_as_peft(lora_rank(base, vlpet_fx.plan(base, budget_rules).trainable_params))
    if kind == "full":
        return copy.deepcopy(base).requires_grad_(True)
    if kind == "eager":
        return vlpet_fx.patch(copy.deepcopy(base), rules)
    if kind == "graph":
        # the graph is captured at this batch's shapes (static shapes), with the model's own kwargs
        return vlpet_fx.patch(copy.deepcopy(base), rules, backend="graph", example_inputs=dict(inputs, use_cache=False))
    if kind == "hand":
        model = hand_reference(base, rules)
        check_hand(model, base, rules, inputs)
        return model
    budget = vlpet_fx.plan(base, rules)  # peft-lora and peft-lora-sites: LoRA with this plan's trainable count
    if kind == "peft-lora":
        return peft_lora(base, lora_rank(base, budget.trainable_params))
    targets = site_targets(base, budget)
    per_rank = sum(m.in_features + m.out_features for m in map(base.get_submodule, targets))
    return peft_lora(base, max(1, round(budget.trainable_params / per_rank)), targets)


def check_hand(hand: nn.Module, base: nn.Module, rules: str, inputs: dict) -> None:
    """The hand-written reference is the compiler's eager patch: the same trainable count, and the same outputs
    once the eager patch has the hand model's PET weights (every PET weight mapped, none left over). The weights
    are moved off their init first (zero-initialised up projections and gates would hide a wiring error)."""
    hand = copy.deepcopy(hand)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in hand.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    eager = vlpet_fx.patch(copy.deepcopy(base), rules)
    hand.eval(), eager.eval()  # no dropout of any kind in the comparison
    n_hand = sum(p.numel() for p in hand.parameters() if p.requires_grad)
    n_eager = sum(p.numel() for p in eager.parameters() if p.requires_grad)
    if n_hand != n_eager:
        raise SystemExit(f"hand/{rules}: {n_hand:,} trainable parameters against the compiler's {n_eager:,}")
    weights = pet_state(hand)
    pet_names = {n for n, _ in eager.named_parameters() if ".pet_" in n}
    if set(weights) != pet_names:
        raise SystemExit(f"hand/{rules}: PET weights do not map one to one: {sorted(set(weights) ^ pet_names)[:4]}")
    hand_params = dict(hand.named_parameters())
    with torch.no_grad():
        for n, p in eager.named_parameters():
            if n in weights:
                p.copy_(weights[n])
            elif p.requires_grad:  # the layer norms: the same names in both
                p.copy_(hand_params[n])
        a, b = hand(**inputs).logits, eager(**inputs).logits
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"hand/{rules}: outputs differ from the compiler's by {(a - b).abs().max().item():.3g}")


def batch(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.src), generator=g)
    dec = torch.randint(3, vocab, (args.batch, args.tgt), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec)


def on_device(model: nn.Module, inputs: dict) -> dict:
    """Move the model to DEVICE; return the inputs there (a captured graph takes use_cache=False as well)."""
    model.to(DEVICE)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    return dict(inputs, use_cache=False) if isinstance(model, torch.fx.GraphModule) else inputs


def forward_backward(fwd, inputs: dict) -> None:
    """One forward and backward; the loss is the mean square of the logits."""
    out = fwd(**inputs)
    logits = out.logits if hasattr(out, "logits") else out["logits"]
    logits.float().square().mean().backward()


def step_flops(model: nn.Module, inputs: dict) -> float:
    """Floating-point operations of one forward + backward (matmuls and convolutions, as
    torch.utils.flop_counter counts them; the optimizer's element-wise update is not counted), in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = on_device(model, inputs)
    with FlopCounterMode(display=False) as counter:
        forward_backward(model, inputs)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 1e9


def step_fn(model: nn.Module, inputs: dict, compile_: bool):
    inputs = on_device(model, inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    fwd = torch.compile(model) if compile_ else model

    def step():
        forward_backward(fwd, inputs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return step, sum(p.numel() for p in params)


def base_model(args) -> nn.Module:
    return no_dropout(build_model(args.model, args.size)).train()


def no_dropout(m: nn.Module) -> nn.Module:
    """Dropout off everywhere (the graph back end is captured in eval mode; keep all variants comparable): the
    nn.Dropout modules and the float rates that attention and layer code pass to F.dropout (T5Attention.dropout,
    BartAttention.dropout, BartEncoderLayer.activation_dropout, ...)."""
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(mod, attr, None), float):
                setattr(mod, attr, 0.0)
    return m


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_memory(args, variant: str) -> None:
    base = base_model(args)
    inputs = batch(args, base.config.vocab_size)
    model = make(variant, base, inputs, args.budget_of)
    del base
    if args.inference:
        model.eval()
        inputs = on_device(model, inputs)
        fwd = torch.compile(model) if parse(variant)[2] else model

        def step():
            with torch.no_grad():
                fwd(**inputs)
    else:
        step, _ = step_fn(model, inputs, parse(variant)[2])
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
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
    ap.add_argument("--ref", default=None, help="the variant the ratios divide by (default: the first hand/...)")
    ap.add_argument("--budget-of", default="vlpet_large", help="rule set whose trainable count eager/lora-peft matches")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--flops", action="store_true", help="also count GFLOP per step (forward + backward)")
    ap.add_argument("--json", default=None, help="write the figures as JSON here")
    ap.add_argument("--memory-of", default=None, metavar="VARIANT",
                    help="only measure this variant's peak memory, in this process (printed as JSON)")
    ap.add_argument("--inference", action="store_true",
                    help="with --memory-of: 3 forwards without autograd (eval mode) instead of 3 training steps")
    args = ap.parse_args()
    if args.inference and not args.memory_of:
        ap.error("--inference measures one variant's memory: give --memory-of VARIANT with it")
    for v in args.variants:
        parse(v)
    if args.memory_of:
        run_memory(args, args.memory_of)
        return

    base = base_model(args)
    inputs = batch(args, base.config.vocab_size)
    steps, trainable, setup_s, gflop = {}, {}, {}, {}
    for v in args.variants:
        t0 = time.perf_counter()
        model = make(v, base, inputs, args.budget_of)
        if args.flops:  # counted on the uncompiled model: inductor does not change the arithmetic
            gflop[v] = step_flops(model, inputs)
        steps[v], trainable[v] = step_fn(model, inputs, parse(v)[2])
        steps[v]()  # warm-up (and, with +compile, the compilation)
        steps[v]()
        setup_s[v] = time.perf_counter() - t0
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for v in args.variants:
            t0 = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - t0)
    mem = {}
    for v in ([] if args.no_memory else args.variants):
        cmd = [sys.executable, __file__, "--memory-of", v, "--model", args.model, "--size", args.size,
               "--batch", str(args.batch), "--src", str(args.src), "--tgt", str(args.tgt), "--budget-of", args.budget_of]
        res = subprocess.run(cmd, capture_output=True, text=True)
        mem[v] = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}

    from rich.console import Console
    from rich.table import Table

    ref = args.ref or next((v for v in args.variants if v.startswith("hand/")), args.variants[0])
    med = {v: statistics.median(ts) for v, ts in times.items()}
    full_pk = mem.get("full", {}).get("peak_mb")
    t = Table(title=f"{args.model}-{args.size} on {DEVICE}: batch {args.batch}, source {args.src}, target {args.tgt}; "
                    f"median of {args.rounds} interleaved rounds; torch {torch.__version__}, {os.cpu_count()} cores")
    cols = ["variant", "trainable", "set-up (s)", "step (s)", f"÷ {ref}", "peak train mem (MB)", "÷ full"]
    if args.flops:
        cols += ["GFLOP/step", f"GFLOP ÷ {ref}", "ms/GFLOP"]
    for col in cols:
        t.add_column(col, justify="left" if col == "variant" else "right")
    rows = []
    for v in args.variants:
        pk = mem.get(v, {}).get("peak_mb")
        row = dict(variant=v, trainable=trainable[v], setup_s=setup_s[v], step_s=med[v], ratio=med[v] / med[ref],
                   peak_mb=pk, mem_ratio=pk / full_pk if pk and full_pk else None, times=times[v])
        cells = [v, f"{trainable[v]:,}", f"{setup_s[v]:.1f}", f"{med[v]:.3f}", f"{med[v] / med[ref]:.3f}",
                 f"{pk:.0f}" if pk else "-", f"{pk / full_pk:.2f}" if pk and full_pk else "-"]
        if args.flops:
            row.update(gflop=gflop[v], gflop_ratio=gflop[v] / gflop[ref], ms_per_gflop=1e3 * med[v] / gflop[v])
            cells += [f"{gflop[v]:.2f}", f"{gflop[v] / gflop[ref]:.3f}", f"{1e3 * med[v] / gflop[v]:.2f}"]
        rows.append(row)
        t.add_row(*cells)
    Console(width=200).print(t)
    if args.json:
        meta = dict(model=args.model, size=args.size, batch=args.batch, src=args.src, tgt=args.tgt, rounds=args.rounds,
                    device=DEVICE, torch=torch.__version__, cores=os.cpu_count(), date=time.strftime("%Y-%m-%d %H:%M"))
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
