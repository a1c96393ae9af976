"""``vlpet-fx``: inspect, patch, train and export PET modules in encoder-decoder models."""

from __future__ import annotations

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
) -> None:
    """Show where PET modules can go: stacks, layers, blocks and sites, with shapes and parameter counts."""
    import vlpet_fx
    from vlpet_fx.errors import VlpetError
    from vlpet_fx.io import write_atomic
    from vlpet_fx.zoo import load_model

    try:
        net, name = load_model(model, size.value, weights=False)
        table = vlpet_fx.discover(net, name=name, fast=not full)
    except VlpetError as exc:
        fail(str(exc))
        return

    if fmt is InspectFormat.json:
        sys.stdout.write(table.to_json() + "\n")
        return
    if fmt in (InspectFormat.svg, InspectFormat.html):
        from vlpet_fx.viz import render_html, render_svg

        target = out_file or Path(f"{_slug(name)}.{fmt.value}")
        doc = render_svg(table) if fmt is InspectFormat.svg else render_html(table)
        try:
            write_atomic(target, doc)
        except OSError as exc:
            fail(f"cannot write '{target}': {exc.strerror or exc}")
        out.print(f"wrote {target} ({len(table)} sites)")
        return

    from .render import site_tree

    out.print(site_tree(net, table, name, expand=expand))
    layers = ", ".join(f"{k} {v} layers" for k, v in table.num_layers().items())
    out.print(
        f"[bold]total:[/] {len(table)} sites in {len(table.blocks())} blocks ({layers}); "
        f"model parameters {table.total_params:,}; captured in {table.meta['seconds']:.1f}s "
        f"({table.meta['graph_nodes']} graph nodes, {table.meta['method']})"
    )


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "model"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
