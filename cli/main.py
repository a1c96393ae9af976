"""``vlpet-fx``: inspect, patch, train and export PET modules in encoder-decoder models."""

from __future__ import annotations

import json
import os
import sys
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain text: "[@local-checkpoint]" must print as written
    help="vlpet-fx: find where parameter-efficient modules belong in a model, and put them there.",
)
out = Console()
err = Console(stderr=True)


class Size(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"
    large = "large"


class InspectFormat(str, Enum):
    tree = "tree"
    json = "json"
    svg = "svg"
    html = "html"


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@contextmanager
def reported(writing: Path | None = None):
    """Turn the library's errors — and, while writing ``writing``, OS errors — into one line and exit code 2."""
    from vlpet_fx.errors import VlpetError

    try:
        yield
    except VlpetError as exc:
        fail(str(exc))
    except OSError as exc:
        if writing is None:
            raise
        fail(f"cannot write '{writing}': {exc.strerror or exc}")


def say_unmatched(plan) -> None:
    """The plan's warning about optional rules that matched no site, if any, on stderr."""
    line = plan.unmatched_warning()
    if line is not None:
        err.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def given(ctx: typer.Context, *names: str) -> list[str]:
    """The options among ``names`` (parameter names) that were typed on the command line, as spelled in help."""
    # by name: typer ships its own copy of click, so click's ParameterSource enum is another class
    opts = {p.name: p.opts[0] for p in ctx.command.params}
    return [opts[n] for n in names if getattr(ctx.get_parameter_source(n), "name", None) == "COMMANDLINE"]


def refuse_ignored(ctx: typer.Context, names: tuple[str, ...], why: str, fix: str) -> None:
    """Exit 2 (one line) if an option that would be ignored was given: no flag is silently dropped."""
    hit = given(ctx, *names)
    if hit:
        fail(f"{' '.join(hit)} {'has' if len(hit) == 1 else 'have'} no effect {why}: {fix}")


RULES_HELP = "A shipped rule set name (e.g. vlpet_large; see `vlpet-fx rules`) or a path to a YAML file."
TRUST_HELP = ("Import and call the package.module:factory that the directory's vlpet.json names as its base model "
              "(off: such a directory is refused; see docs/SECURITY.md). Only for directories you trust.")
MODEL_HELP = "A built-in name (see `vlpet-fx models`), a local Hugging Face directory, or package.module:factory."


@app.command()
def models() -> None:
    """List the built-in models."""
    from rich.table import Table

    from vlpet_fx.zoo import list_models

    table = Table(title="built-in models (random weights; --size tiny|small|base|large)")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    for entry in list_models():
        table.add_row(entry.name, entry.description)
    out.print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    size: Size = typer.Option(Size.tiny, "--size", "-s", help="Size of a built-in model."),
    fmt: InspectFormat = typer.Option(InspectFormat.tree, "--format", "-f", help="tree (printed), json, svg or html."),
    out_file: Path = typer.Option(None, "--out", "-o", help="Where to write the json, svg or html output (json default: printed; svg/html default: MODEL.svg/.html)."),
    expand: bool = typer.Option(False, "--expand", help="Print every layer, even identical ones."),
    full: bool = typer.Option(False, "--full", help="Capture every layer (no depth reduction)."),
    rules: str = typer.Option(None, "--rules", "-r", help="Mark the sites this rule set hits. " + RULES_HELP),
) -> None:
    """Show where PET modules can go: stacks, layers, blocks and sites, with shapes and parameter counts."""
    import vlpet_fx
    from vlpet_fx.io import write_atomic
    from vlpet_fx.zoo import load_model

    if expand and fmt is not InspectFormat.tree:
        fail("--expand changes the printed tree only: drop it, or use --format tree")
    if out_file is not None and fmt is InspectFormat.tree:
        fail("--out writes json, svg or html: add --format json|svg|html (the tree is printed)")
    with reported():
        rs = vlpet_fx.load_rules(rules) if rules is not None else None  # a bad rules file fails before any work
        net, name = load_model(model, size.value, weights=False)
        table = vlpet_fx.discover(net, name=name, fast=not full)
        hits = None
        if rs is not None:
            the_plan = vlpet_fx.plan(net, rs, table=table)
            hits = {p.site.key for p in the_plan.placements}
            say_unmatched(the_plan)

    if fmt is InspectFormat.json:
        doc = table.to_dict()
        if rules is not None:  # the rule set's hits: one entry per placement, with its site
            doc["hits"] = [p.public() for p in the_plan.placements]
            doc["unmatched"] = list(the_plan.unmatched)
        text = json.dumps(doc) + "\n"
        if out_file is None:
            sys.stdout.write(text)
            return
        with reported(writing=out_file):
            write_atomic(out_file, text)
        out.print(f"wrote {out_file} ({len(table)} sites)", highlight=False, markup=False)
        return
    if fmt in (InspectFormat.svg, InspectFormat.html):
        from vlpet_fx.viz import render_html, render_svg

        target = out_file or Path(f"{_slug(name)}.{fmt.value}")
        doc = render_svg(table, hits=hits) if fmt is InspectFormat.svg else render_html(table, hits=hits)
        with reported(writing=target):
            write_atomic(target, doc)
        out.print(f"wrote {target} ({len(table)} sites)")
        return

    from .render import site_tree

    out.print(site_tree(net, table, name, expand=expand, hits=hits))
    layers = ", ".join(f"{k} {v} layers" for k, v in table.num_layers().items())
    out.print(
        f"[bold]total:[/] {len(table)} sites in {len(table.blocks())} blocks ({layers}); "
        f"model parameters {table.total_params:,}; captured in {table.meta['seconds']:.1f}s "
        f"({table.meta['graph_nodes']} graph nodes, {table.meta['method']})"
    )


class PatchFormat(str, Enum):
    table = "table"
    json = "json"


@app.command("rules")
def list_rules() -> None:
    """List the shipped rule sets."""
    from rich.table import Table

    import vlpet_fx

    table = Table(title="shipped rule sets (--rules NAME)")
    table.add_column("name", style="bold")
    table.add_column("what it does")
    for name in vlpet_fx.shipped_rule_names():
        table.add_row(name, vlpet_fx.load_rules(name).description)
    out.print(table)


@app.command()
def patch(
    model: str = typer.Argument(..., help=MODEL_HELP),
    rules: str = typer.Option(..., "--rules", "-r", help=RULES_HELP),
    size: Size = typer.Option(Size.tiny, "--size", "-s", help="Size of a built-in model."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only resolve the rules: print placements and budget."),
    fmt: PatchFormat = typer.Option(PatchFormat.table, "--format", "-f", help="table or json: the plan (with --dry-run) or what was written."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Directory to write the patched model to (must be new or empty)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in base model's random weights and the PET init."),
) -> None:
    """Resolve a rule set against a model and insert the PET modules (or, with --dry-run, show what would go where)."""
    import vlpet_fx
    from vlpet_fx.export import save_patched
    from vlpet_fx.export.atomic import check_out_dir
    from vlpet_fx.zoo import base_reference, load_model

    if not dry_run and out_dir is None:
        fail("say where to write the patched model with --out DIR, or use --dry-run to only show the plan")
    with reported(writing=out_dir):
        rs = vlpet_fx.load_rules(rules)
        if out_dir is not None and not dry_run:
            check_out_dir(out_dir)
        net, name = load_model(model, size.value, weights=not dry_run, seed=seed)
        the_plan = vlpet_fx.plan(net, rs, name=name)
        say_unmatched(the_plan)
        if dry_run:
            if fmt is PatchFormat.json:
                sys.stdout.write(json.dumps(the_plan.to_dict()) + "\n")
            else:
                from .render import plan_table

                out.print(plan_table(the_plan))
            return
        vlpet_fx.patch(net, the_plan, seed=seed)
        save_patched(net, out_dir, base_reference(model, size.value, seed))
    s = vlpet_fx.summary(net)
    if fmt is PatchFormat.json:
        doc = {"out": str(out_dir), **the_plan.to_dict(), "trainable_percent": round(s.percent, 4)}
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    out.print(f"wrote {out_dir}: {len(the_plan.placements)} PET modules; trainable {s.trainable:,} of "
              f"{s.total:,} parameters ({s.percent:.2f}%)")


class ExportFormat(str, Enum):
    adapters = "adapters"
    merged = "merged"
    pt2 = "pt2"
    peft = "peft"


@app.command("export")
def export_cmd(
    src: Path = typer.Argument(..., help="A directory written by `vlpet-fx patch --out` (or `train`)."),
    fmt: ExportFormat = typer.Option(..., "--format", "-f", help="adapters, merged, pt2 or peft."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write (must be new or empty)."),
    force: bool = typer.Option(False, "--force", help="Load even if the base model's fingerprint differs."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help=TRUST_HELP),
) -> None:
    """Write a patched model as adapters (safetensors + manifest), a merged HF model, .pt2 programs or a PEFT adapter."""
    from vlpet_fx.export import export

    with reported(writing=out_dir):
        export(src, fmt.value, out_dir, force=force, trust_code=trust_factory)
    files = ", ".join(sorted(p.name for p in out_dir.iterdir()))
    out.print(f"wrote {out_dir} ({fmt.value}): {files}")


class AnswerFormat(str, Enum):
    text = "text"
    json = "json"


SRC_HELP = ("A `vlpet-fx train` run directory, a patched directory (`patch --out`) or an adapters directory "
            "(`export --format adapters`).")
BASE_HELP = ("Base model for an adapters directory, instead of the one its manifest names: a full fine-tuning "
             "run or a patched directory with no PET modules.")
TOKENIZER_HELP = "The tokenizer directory (default: SRC/tokenizer, or the run's tokenizer/)."
BEAMS_HELP = "Beam-search width (1: greedy)."
MAX_NEW_HELP = "Longest answer, in tokens."
DEVICE_HELP = "Device to run on (cpu, cuda, cuda:1, ...)."


def _load_predictor(src: Path, base: Path | None, tokenizer: Path | None, device: str, force: bool):
    from vlpet_fx.infer import Predictor

    return Predictor.from_dir(src, base=base, tokenizer=tokenizer, device=device, force=force)


@app.command()
def predict(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help=SRC_HELP),
    prompt: str = typer.Option(None, "--prompt", "-p", help="The question with its task prefix, e.g. 'vqa: what is this?'."),
    image: list[Path] = typer.Option(None, "--image", "-i", help="An image file the prompt is about; repeat for several."),
    data: Path = typer.Option(None, "--data", help="Answer every row of this JSONL file (the format `train --data` reads)."),
    fmt: AnswerFormat = typer.Option(AnswerFormat.text, "--format", "-f", help="text (the answer) or json (with scores)."),
    out_file: Path = typer.Option(None, "--out", "-o", help="With --data: write the answers as JSONL to this file."),
    num_beams: int = typer.Option(1, "--num-beams", help=BEAMS_HELP),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help=MAX_NEW_HELP),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Examples per generate call (with --data)."),
    base: Path = typer.Option(None, "--base", help=BASE_HELP),
    tokenizer: Path = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Load even if the base model's fingerprint differs."),
) -> None:
    """Answer a prompt about one or more images (or every row of a JSONL file) with a trained model."""
    from vlpet_fx.infer import predict as run_predict
    from vlpet_fx.io import write_atomic

    if (prompt is None) == (data is None):
        fail("give --prompt with --image, or --data FILE.jsonl")
    if prompt is not None and not image:
        fail("give the image the prompt is about with --image FILE (repeat for several)")
    if data is not None and image:
        fail("--image goes with --prompt; the rows of --data name their own images")
    if out_file is not None and data is None:
        fail("--out writes the answers of --data; without --data the answer is printed")
    if data is None:
        refuse_ignored(ctx, ("batch_size",), "without --data (one prompt is one example)", "drop it")
    with reported(writing=out_file):
        pred = _load_predictor(src, base, tokenizer, device, force)
        if prompt is not None:
            answers = [run_predict(pred, prompt, list(image), num_beams=num_beams, max_new_tokens=max_new_tokens)]
        else:
            answers = run_predict(pred, data=data, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
        if out_file is not None:
            write_atomic(out_file, "".join(json.dumps(a.to_dict()) + "\n" for a in answers))
    if fmt is AnswerFormat.json:
        doc = answers[0].to_dict() if prompt is not None else {"answers": [a.to_dict() for a in answers]}
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    for a in answers:
        line = a.answer if prompt is not None else f"{a.prompt}\t{a.answer}"
        sys.stdout.write(line + "\n")
    if out_file is not None:
        err.print(f"wrote {out_file} ({len(answers)} answers)", highlight=False)


@app.command()
def evaluate(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help=SRC_HELP),
    data: Path = typer.Option(None, "--data", help="Held-out examples (JSONL, the format `train --data` reads)."),
    task: list[str] = typer.Option(None, "--task", "-t", help="A built-in task to score on instead (vqa, gqa, nlvr, caption); repeat."),
    source: str = typer.Option(None, "--source", help="Images of the built-in tasks (default: the run's own --source)."),
    n: int = typer.Option(100, "--n", help="Examples per built-in task."),
    split: str = typer.Option("test", "--split", help="Split of the built-in tasks' images: train, val or test."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in tasks' example sampling."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="New directory for predictions.jsonl and scores.json (written at once)."),
    fmt: AnswerFormat = typer.Option(AnswerFormat.text, "--format", "-f", help="text (a table) or json (the scores)."),
    num_beams: int = typer.Option(1, "--num-beams", help=BEAMS_HELP),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help=MAX_NEW_HELP),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Examples per generate call."),
    on_bad_rows: str = typer.Option("stop", "--on-bad-rows", help="stop at, or skip, rows of --data that are missing/unreadable."),
    base: Path = typer.Option(None, "--base", help=BASE_HELP),
    tokenizer: Path = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Load even if the base model's fingerprint differs."),
) -> None:
    """Score a trained model on held-out data with each task's metrics (exact match, accuracy, BLEU-4, CIDEr)."""
    from vlpet_fx.infer import evaluate as run_evaluate

    if (data is None) == (not task):
        fail("give held-out data with --data FILE.jsonl, or built-in tasks with --task NAME")
    if on_bad_rows not in ("stop", "skip"):
        fail(f"--on-bad-rows must be stop or skip, not '{on_bad_rows}'")
    if data is None and split not in ("train", "val", "test"):
        fail(f"--split must be train, val or test, not '{split}'")
    if data is not None:
        refuse_ignored(ctx, ("source", "n", "split", "seed"), "with --data (they choose built-in task examples)",
                       "drop them, or give --task instead of --data")
    else:
        refuse_ignored(ctx, ("on_bad_rows",), "without --data", "drop it, or give --data FILE.jsonl")
    with reported(writing=out_dir):
        pred = _load_predictor(src, base, tokenizer, device, force)
        result = run_evaluate(pred, data=data, tasks=list(task) if task else None, source=source, n=n, split=split,
                              seed=seed, num_beams=num_beams, max_new_tokens=max_new_tokens, batch_size=batch_size,
                              on_bad_rows=on_bad_rows, out=out_dir)
    result.pop("predictions")
    if fmt is AnswerFormat.json:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    out.print(_scores_table(f"{src}: {result['examples']} examples", result))
    if result["bad_rows"]:
        err.print(f"skipped {len(result['bad_rows'])} bad rows, first: {result['bad_rows'][0]}", highlight=False,
                  markup=False)
    if out_dir is not None:
        out.print(f"wrote {out_dir}: predictions.jsonl, scores.json", highlight=False, markup=False)


@app.command()
def serve(
    src: Path = typer.Argument(..., help=SRC_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    allow_paths: Path = typer.Option(None, "--allow-paths", help="Let requests name image files inside this directory (default: images only as base64 bytes)."),
    max_body_mb: float = typer.Option(8.0, "--max-body-mb", help="Largest request body, in MiB."),
    max_image_pixels: int = typer.Option(4096 * 4096, "--max-image-pixels", help="Largest image (width × height) accepted."),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", help="How long to collect concurrent requests into one batch."),
    max_batch: int = typer.Option(16, "--max-batch", help="Most requests answered by one generate call."),
    num_beams: int = typer.Option(1, "--num-beams", help=BEAMS_HELP + " Default for requests that do not say."),
    max_new_tokens: int = typer.Option(16, "--max-new-tokens", help=MAX_NEW_HELP + " Default for requests that do not say."),
    base: Path = typer.Option(None, "--base", help=BASE_HELP),
    tokenizer: Path = typer.Option(None, "--tokenizer", help=TOKENIZER_HELP),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Load even if the base model's fingerprint differs."),
) -> None:
    """Answer prompts about images over HTTP: POST /predict (JSON), GET /health; concurrent requests are batched."""
    try:
        import uvicorn

        from vlpet_fx.serve import ServeConfig, create_app
    except ImportError as exc:
        fail(f"serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'vlpet-fx[serve]'")
    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, not {port}")
    with reported():
        cfg = ServeConfig(max_body_bytes=int(max_body_mb * (1 << 20)), max_pixels=max_image_pixels,
                          allow_paths=allow_paths, batch_window_ms=batch_window_ms, max_batch=max_batch,
                          num_beams=num_beams, max_new_tokens=max_new_tokens)
        from vlpet_fx.infer.predictor import check_generation

        check_generation(num_beams, max_new_tokens)
        app_ = create_app(_load_predictor(src, base, tokenizer, device, force), cfg)
    err.print(f"serving {src} on http://{host}:{port} (POST /predict, GET /health)", highlight=False, markup=False)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def _scores_table(title: str, result: dict):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("task")
    table.add_column("scores")
    table.add_column("main", justify="right")
    for t, s in (result["scores"] or {}).items():
        table.add_row(t, ", ".join(f"{k} {v:.1f}" for k, v in s.items()), f"{result['main'].get(t, 0):.1f}")
    if result["average"] is not None:
        table.add_row("[bold]average[/]", "", f"[bold]{result['average']:.1f}[/]")
    return table


def _tasks(specs: list[str]) -> list[tuple[str, float]]:
    out = []
    for spec in specs:
        name, _, weight = spec.partition(":")
        try:
            out.append((name, float(weight) if weight else 1.0))
        except ValueError:
            fail(f"bad --task '{spec}': write NAME or NAME:WEIGHT, e.g. vqa:2")
    return out


@app.command()
def train(
    ctx: typer.Context,
    out_dir: Path = typer.Option(Path("runs/vl-t5"), "--out", "-o", help="Run directory (new, or an old one with --resume)."),
    rules: str = typer.Option("vlpet_large", "--rules", "-r", help=RULES_HELP),
    init_from: Path = typer.Option(None, "--init-from", help="Backbone: the model of an earlier full fine-tuning run."),
    text: str = typer.Option("t5", "--text", help="Text encoder-decoder: built-in name or local HF directory."),
    size: Size = typer.Option(Size.tiny, "--size", "-s", help="Size of a built-in text model."),
    visual: str = typer.Option("clip-vit-b-32", "--visual", help="Image encoder (clip-vit-b-32, clip-rn50, efficientnet-lite0)."),
    visual_size: str = typer.Option("tiny", "--visual-size",
                                    help="tiny/small/base, or for --visual open_clip: ARCH[@local-checkpoint]."),
    tokens_per_image: int = typer.Option(None, "--tokens-per-image",
                                         help="Concatenate each image's encoder tokens into this many visual tokens (default: keep all)."),
    task: list[str] = typer.Option(["vqa", "gqa", "nlvr", "caption"], "--task", "-t",
                                   help="Built-in task with an optional sampling weight (vqa, gqa:2, ...); repeat."),
    data: Path = typer.Option(None, "--data", help="Your own examples (JSONL: images, input, target, task)."),
    eval_data: Path = typer.Option(None, "--eval-data", help="JSONL for evaluation (default: --data)."),
    on_bad_rows: str = typer.Option("stop", "--on-bad-rows", help="stop at, or skip, rows that are missing/unreadable."),
    source: str = typer.Option("fashion-mnist", "--source", help="Images of the built-in tasks: fashion-mnist, mnist, digits."),
    train_per_task: int = typer.Option(2000, "--train-per-task", help="Training examples built per built-in task."),
    eval_per_task: int = typer.Option(100, "--eval-per-task", help="Validation examples built per built-in task."),
    text_only: bool = typer.Option(False, "--text-only", help="Control run: blank images (shows the image is used)."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps (not with --epochs)."),
    epochs: float = typer.Option(None, "--epochs", help="Train for this many epochs instead of --steps."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", help="Global batch per optimizer step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Split each process's share into this many micro-batches."),
    recipe: str = typer.Option("quick", "--recipe", help="Defaults of the options below: quick (lr 1e-3, decay of matrices only, the model's dropout, greedy evaluation) or paper (the VL-PET authors': lr 1e-3 BART / 3e-4 T5 / 1e-4 full fine-tuning, no decay only for names with bias or LayerNorm.weight, dropout 0.1, 5 beams). Both: warm-up 0.1, clip 5, eps 1e-6, decay 0.01. Options given explicitly win; run.json records the result."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate of AdamW (default: the recipe's for the backbone)."),
    schedule: str = typer.Option("linear", "--schedule", help="linear, cosine or constant (after warm-up)."),
    warmup: float = typer.Option(None, "--warmup", help="Warm-up as a fraction of the steps (default 0.1)."),
    weight_decay: float = typer.Option(None, "--weight-decay", help="AdamW weight decay of the decayed group (default 0.01)."),
    decay_grouping: str = typer.Option(None, "--decay-grouping", help="Which parameters are not decayed: paper (names with bias or LayerNorm.weight) or ndim (every parameter of at most 1 dimension). Default: paper with --recipe paper or a paper rule set (vlpet_*, vl_adapter), else ndim."),
    grad_clip: float = typer.Option(None, "--grad-clip", help="Clip the gradient norm to this value (default 5); 0 turns it off."),
    adam_eps: float = typer.Option(None, "--adam-eps", help="AdamW epsilon (default 1e-6)."),
    dropout: float = typer.Option(None, "--dropout", help="Every dropout rate of the text model (default: quick keeps its config's, paper 0.1)."),
    num_beams: int = typer.Option(None, "--num-beams", help="Beam-search width of the evaluations during training (default: quick 1 = greedy, paper 5)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model's initialisation, the data sampling and the steps' batches."),
    precision: str = typer.Option("no", "--precision", help="no, bf16 or fp16 (mixed precision)."),
    eval_every: int = typer.Option(100, "--eval-every", help="Evaluate on the validation examples every N steps (and at the end); 0 turns the periodic ones off."),
    save_every: int = typer.Option(100, "--save-every", help="Write a resumable checkpoint every N steps; 0 turns checkpoints off."),
    log_every: int = typer.Option(10, "--log-every", help="When the output is not a terminal: print a plain progress line every N steps; 0 turns it off."),
    fmt: AnswerFormat = typer.Option(AnswerFormat.text, "--format", "-f", help="text (a table) or json (the final summary, as report.json)."),
    feature_cache: Path = typer.Option(None, "--feature-cache", help="Directory caching the frozen image features."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="With --init-from: " + TRUST_HELP),
) -> None:
    """Train a VL model patched by a rule set on real offline image tasks (or your JSONL data)."""
    from vlpet_fx.data.tasks import list_tasks
    from vlpet_fx.train import TrainConfig
    from vlpet_fx.train import train as run_training

    tasks = _tasks(task)
    known = set(list_tasks())
    for name, _ in tasks:
        if data is None and name not in known:
            fail(f"unknown task '{name}': choose from {', '.join(sorted(known))}, or give your own --data file")
    if on_bad_rows not in ("stop", "skip"):
        fail(f"--on-bad-rows must be stop or skip, not '{on_bad_rows}'")
    from vlpet_fx.data.images import data_file_line
    from vlpet_fx.data.jsonl import MAX_FILE_BYTES
    from vlpet_fx.io import FileProblem, check_user_file

    for f in (data, eval_data):
        try:
            if f is not None:
                check_user_file(f, MAX_FILE_BYTES)
        except FileProblem as why:
            fail(f"data file {data_file_line(why)}")
    with reported():
        cfg = TrainConfig(out=str(out_dir), init_from=str(init_from) if init_from else None, text=text, size=size.value, visual=visual, visual_size=visual_size, tokens_per_image=tokens_per_image,
                      rules=rules, tasks=tasks, data=str(data) if data else None,
                      eval_data=str(eval_data) if eval_data else None, on_bad_rows=on_bad_rows, source=source,
                      train_per_task=train_per_task, eval_per_task=eval_per_task, text_only=text_only, steps=steps,
                      epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, recipe=recipe, lr=lr, schedule=schedule,
                      warmup=warmup, weight_decay=weight_decay, decay_grouping=decay_grouping, grad_clip=grad_clip,
                      adam_eps=adam_eps, dropout=dropout, num_beams=num_beams, seed=seed, precision=precision,
                      eval_every=eval_every, save_every=save_every,
                      feature_cache=str(feature_cache) if feature_cache else None, resume=resume,
                      trust_code=trust_factory)
    # no option is silently dropped: those that the chosen mode does not read are refused
    if data is not None:
        refuse_ignored(ctx, ("task", "source", "train_per_task", "eval_per_task"), "with --data (its rows name "
                       "their tasks and images)", "drop them, or drop --data to train on built-in tasks")
    else:
        refuse_ignored(ctx, ("eval_data", "on_bad_rows"), "without --data", "give --data FILE.jsonl, or drop them")
    if epochs is not None:
        refuse_ignored(ctx, ("steps",), "with --epochs (it sets the number of steps)", "give one of them")
    if init_from is not None:
        refuse_ignored(ctx, ("text", "size", "visual", "visual_size", "tokens_per_image"), "with --init-from (the "
                       "backbone run fixes the model)", "drop them, or drop --init-from to build a new model")
    else:
        refuse_ignored(ctx, ("trust_factory",), "without --init-from", "drop it, or give --init-from RUN")
    if log_every < 0:
        fail(f"--log-every must be 0 (off) or a number of steps, not {log_every}")
    with reported():
        # with --format json, stdout carries the JSON only: the progress goes to stderr
        report = run_training(cfg, console=err if fmt is AnswerFormat.json else out, log_every=log_every)
    if not report:
        return  # not the main process
    if fmt is AnswerFormat.json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = _scores_table(f"{out_dir}: {rules}, {report['steps']} steps", report)
    table.caption = (f"trainable {report['trainable_params']:,} of {report['patched_params']:,} parameters "
                     f"({report['trainable_percent']:.2f}%); curves: {escape(str(out_dir / 'curves.png'))}")
    out.print(table)


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories written by `vlpet-fx train`."),
    fmt: AnswerFormat = typer.Option(AnswerFormat.text, "--format", "-f", help="text (a table) or json (one object per run)."),
) -> None:
    """Compare finished runs side by side: trainable parameters and the main score of every task."""
    from rich.table import Table

    from vlpet_fx.train.report import read_report

    docs = {}
    with reported():
        for run in runs:
            docs[run] = read_report(run).model_dump()
    from vlpet_fx.train.health import collapse_warning

    for run, d in docs.items():
        warning = collapse_warning(d.get("encoder_position_cos"))
        if warning is not None:
            err.print(f"[yellow]warning:[/] {escape(str(run))}: {escape(warning)}", highlight=False, soft_wrap=True)
    if fmt is AnswerFormat.json:
        rows = [{"run": str(run), "rules": d.get("rules"), "trainable_percent": d.get("trainable_percent"),
                 "main": d.get("main") or {}, "average": d.get("average"),
                 "encoder_position_cos": d.get("encoder_position_cos")} for run, d in docs.items()]
        sys.stdout.write(json.dumps({"runs": rows}) + "\n")
        return
    tasks = list(dict.fromkeys(t for d in docs.values() for t in (d.get("main") or {})))
    table = Table(title="runs")
    for col in ["run", "rules", "trainable %", *tasks, "average"]:
        table.add_column(col, justify="left" if col in ("run", "rules") else "right")
    for run, d in docs.items():
        main = d.get("main") or {}
        avg = d.get("average")
        table.add_row(escape(str(run)), escape(str(d.get("rules"))), f"{d['trainable_percent']:.2f}",
                      *[f"{main[t]:.1f}" if t in main else "-" for t in tasks], f"{avg:.1f}" if avg is not None else "-")
    table.caption = "main score: exact match (vqa, gqa), accuracy (nlvr), CIDEr (caption)"
    out.print(table)


@app.command("bert2bert")
def bert2bert_cmd(
    out_dir: Path = typer.Argument(..., help="New (or empty) directory to write the seq2seq checkpoint to."),
    encoder: Path = typer.Option(None, "--encoder", help="A local BERT-style checkpoint directory with its tokenizer "
                                 "(default: all-MiniLM-L6-v2 from the pretrained extra)."),
    decoder: Path = typer.Option(None, "--decoder", help="Checkpoint for the decoder (default: the encoder's)."),
) -> None:
    """Write a BERT2BERT encoder-decoder warm-started from local BERT checkpoints, with its tokenizer; train it
    with `vlpet-fx train --text OUT_DIR`."""
    from vlpet_fx.zoo.pretrained import write_bert2bert

    with reported(writing=out_dir):
        write_bert2bert(out_dir, encoder, decoder)
    out.print(f"wrote {out_dir} (EncoderDecoderModel + tokenizer); train it with: vlpet-fx train --text {out_dir}",
              highlight=False, markup=False)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "model"


def configure_process() -> None:
    """Process-wide settings of the command line (the library sets none): no model hub, quiet transformers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight loading/saving bars
    warnings.showwarning = _warning_line


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning is one line on stderr ("warning: ..."), without the source line Python would print under it."""
    err.print(f"[yellow]warning:[/] {escape(' '.join(str(message).split()))}", highlight=False, soft_wrap=True)


def main() -> None:
    configure_process()
    app()


if __name__ == "__main__":
    main()
