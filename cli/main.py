"""``vlpet-fx``: inspect, patch, train and export PET modules in encoder-decoder models."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="vlpet-fx: find where parameter-efficient modules belong in a model, and put them there.",
)
out = Console()
err = Console(stderr=True)


class Size(str, Enum):
    tiny = "tiny"
    small = "small"
    base = "base"


class InspectFormat(str, Enum):
    tree = "tree"
    json = "json"
    svg = "svg"
    html = "html"


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


RULES_HELP = "A shipped rule set name (e.g. vlpet_large; see `vlpet-fx rules`) or a path to a YAML file."
MODEL_HELP = "A built-in name (see `vlpet-fx models`), a local Hugging Face directory, or package.module:factory."


@app.command()
def models() -> None:
    """List the built-in models."""
    from rich.table import Table

    from vlpet_fx.zoo import list_models

    table = Table(title="built-in models (random weights; --size tiny|small|base)")
    table.add_column("name", style="bold")
    table.add_column("what it is")
    for entry in list_models():
        table.add_row(entry.name, entry.description)
    out.print(table)


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    size: Size = typer.Option(Size.tiny, "--size", "-s", help="Size of a built-in model."),
    fmt: InspectFormat = typer.Option(InspectFormat.tree, "--format", "-f", help="tree, json, svg or html."),
    out_file: Path = typer.Option(None, "--out", "-o", help="Where to write the svg/html picture."),
    expand: bool = typer.Option(False, "--expand", help="Print every layer, even identical ones."),
    full: bool = typer.Option(False, "--full", help="Capture every layer (no depth reduction)."),
    rules: str = typer.Option(None, "--rules", "-r", help="Mark the sites this rule set hits. " + RULES_HELP),
) -> None:
    """Show where PET modules can go: stacks, layers, blocks and sites, with shapes and parameter counts."""
    import vlpet_fx
    from vlpet_fx.errors import VlpetError
    from vlpet_fx.io import write_atomic
    from vlpet_fx.zoo import load_model

    try:
        net, name = load_model(model, size.value, weights=False)
        table = vlpet_fx.discover(net, name=name, fast=not full)
        hits = None
        if rules is not None:
            the_plan = vlpet_fx.plan(net, rules, table=table)
            hits = {p.site.key for p in the_plan.placements}
    except VlpetError as exc:
        fail(str(exc))
        return

    if fmt is InspectFormat.json:
        sys.stdout.write(table.to_json() + "\n")
        return
    if fmt in (InspectFormat.svg, InspectFormat.html):
        from vlpet_fx.viz import render_html, render_svg

        target = out_file or Path(f"{_slug(name)}.{fmt.value}")
        doc = render_svg(table, hits=hits) if fmt is InspectFormat.svg else render_html(table, hits=hits)
        try:
            write_atomic(target, doc)
        except OSError as exc:
            fail(f"cannot write '{target}': {exc.strerror or exc}")
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
    fmt: PatchFormat = typer.Option(PatchFormat.table, "--format", "-f", help="table or json (with --dry-run)."),
    out_dir: Path = typer.Option(None, "--out", "-o", help="Directory to write the patched model to (must be new or empty)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the built-in base model's random weights and the PET init."),
) -> None:
    """Resolve a rule set against a model and insert the PET modules (or, with --dry-run, show what would go where)."""
    import vlpet_fx
    from vlpet_fx.errors import VlpetError
    from vlpet_fx.export import save_patched
    from vlpet_fx.export.atomic import check_out_dir
    from vlpet_fx.zoo import base_reference, load_model

    if not dry_run and out_dir is None:
        fail("say where to write the patched model with --out DIR, or use --dry-run to only show the plan")
    try:
        rs = vlpet_fx.load_rules(rules)
        if out_dir is not None and not dry_run:
            check_out_dir(out_dir)
        net, name = load_model(model, size.value, weights=not dry_run, seed=seed)
        the_plan = vlpet_fx.plan(net, rs, name=name)
        if dry_run:
            if fmt is PatchFormat.json:
                sys.stdout.write(json.dumps(the_plan.to_dict()) + "\n")
            else:
                from .render import plan_table

                out.print(plan_table(the_plan))
            return
        vlpet_fx.patch(net, the_plan, seed=seed)
        save_patched(net, out_dir, base_reference(model, size.value, seed))
    except VlpetError as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"cannot write '{out_dir}': {exc.strerror or exc}")
        return
    s = vlpet_fx.summary(net)
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
) -> None:
    """Write a patched model as adapters (safetensors + manifest), a merged HF model, .pt2 programs or a PEFT adapter."""
    from vlpet_fx.errors import VlpetError
    from vlpet_fx.export import export

    try:
        export(src, fmt.value, out_dir, force=force)
    except VlpetError as exc:
        fail(str(exc))
        return
    except OSError as exc:
        fail(f"cannot write '{out_dir}': {exc.strerror or exc}")
        return
    files = ", ".join(sorted(p.name for p in out_dir.iterdir()))
    out.print(f"wrote {out_dir} ({fmt.value}): {files}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "model"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
