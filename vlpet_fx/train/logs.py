"""Run logs: metrics as JSONL (and CSV at the end), a PNG plot of the curves, rich progress."""

from __future__ import annotations

import contextlib
import csv
import json
from pathlib import Path

from ..io import write_atomic


class MetricsLog:
    """Rows of ``metrics.jsonl``. ``deferred=True`` keeps rows in memory until :meth:`flush` (a run writes nothing
    into its directory before its first checkpoint); :meth:`resume` cuts the file back to a checkpoint's step."""

    def __init__(self, run: Path, enabled: bool = True, deferred: bool = False):
        self.path = run / "metrics.jsonl"
        self.enabled = enabled
        self.deferred = deferred
        self.rows: list[dict] = []
        self.pending: list[dict] = []

    def resume(self, step: int, keep_eval_at_step: bool) -> int:
        """Keep the rows logged up to ``step``: training rows at steps <= ``step``, evaluation rows before it (and
        at it if ``keep_eval_at_step``). Damaged lines (a half-written tail) are dropped; the file is rewritten
        atomically. Returns the number of lines dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                dropped += 1
                continue
            if not _valid_row(row):
                dropped += 1
                continue
            at = row["step"]
            if at < step or (at == step and ("eval" not in row or keep_eval_at_step)):
                kept.append(row)
            else:
                dropped += 1
        self.rows = kept
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        return dropped

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        if self.deferred:
            self.pending.append(row)
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        """Write the rows kept in memory and write every later row at once."""
        if self.enabled and self.deferred:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(json.dumps(r) + "\n" for r in self.pending))
        self.pending = []
        self.deferred = False

    def to_csv(self) -> None:
        keys: dict[str, None] = {}
        for r in self.rows:
            keys.update(dict.fromkeys(r))
        with open(self.path.with_suffix(".csv"), "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(keys))
            w.writeheader()
            w.writerows(self.rows)


def _valid_row(row) -> bool:
    """A row this module writes: an int step, then a training row's numbers or an evaluation row's scores."""
    if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
        return False
    if "eval" in row:
        return isinstance(row["eval"], str) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in row.items() if k not in ("step", "eval"))
    return all(isinstance(row.get(k), (int, float)) and not isinstance(row.get(k), bool)
               for k in ("loss", "lr", "steps_per_s"))


def plot_curves(log: MetricsLog, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import main_score

    train = [r for r in log.rows if "loss" in r]
    evals = [r for r in log.rows if "eval" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    a.set_xlabel("step")
    a.set_ylabel("training loss (per token)")
    a.set_yscale("log")
    for task in dict.fromkeys(r["eval"] for r in evals):
        rs = [r for r in evals if r["eval"] == task]
        b.plot([r["step"] for r in rs], [main_score(task, r) for r in rs], marker="o", label=task)
    b.set_xlabel("step")
    b.set_ylabel("validation score")
    if evals:
        b.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)


class _Bar:
    def __init__(self, prog, task):
        self.prog, self.task = prog, task

    def update(self, done, loss, lr, rate):
        if self.prog is not None:
            self.prog.update(self.task, completed=done,
                             info=f"loss {loss:.3f}  lr {lr:.2e}  {rate:.2f} steps/s")


class _Lines:
    """Progress for a log that is not a terminal: one plain line every ``every`` steps (and at the last)."""

    def __init__(self, console, total: int, every: int):
        self.console, self.total, self.every = console, total, every

    def update(self, done, loss, lr, rate):
        if self.every and (done % self.every == 0 or done == self.total):
            left = (self.total - done) / rate if rate > 0 else 0.0
            self.console.print(f"train step {done}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {rate:.2f} steps/s  "
                               f"eta {left:.0f}s", markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress(console, total: int, start: int, enabled: bool = True, every: int = 10):
    """A Rich progress bar on a terminal; plain lines every ``every`` steps otherwise (0: none)."""
    if not enabled:
        yield _Bar(None, None)
        return
    if console is None or not console.is_terminal:
        if console is None:
            from rich.console import Console

            console = Console(stderr=True)
        yield _Lines(console, total, every)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task("train", total=total, completed=start, info="")
        yield _Bar(prog, task)
