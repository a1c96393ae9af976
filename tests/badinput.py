"""Helpers of the table-driven bad-input tests: run `vlpet-fx` (in this process through Typer's runner, or as a
real subprocess), and check the answer is exit 2 with one line naming the problem and that nothing was written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
# a tiny training: 1 step of a tiny model on 16 digit images per task, no checkpoint, no evaluation on the way
TINY = {"--source": "digits", "--task": "vqa", "--train-per-task": "16", "--eval-per-task": "4",
        "--batch-size": "8", "--eval-every": "0", "--save-every": "0", "--steps": "1"}


# options of the built-in tasks: `train` refuses them with --data (its rows name their tasks and images)
BUILTIN_ONLY = ("--source", "--task", "--train-per-task", "--eval-per-task")


def tiny_args(args: list[str], **extra: str) -> list[str]:
    """``args`` followed by every tiny-training option they do not set themselves (and that their mode reads:
    no built-in task options with --data, no --steps with --epochs)."""
    given = set(args)
    out = list(args)
    for k, v in {**TINY, **extra}.items():
        if k in given or ("--data" in given and k in BUILTIN_ONLY) or ("--epochs" in given and k == "--steps"):
            continue
        out += [k, v]
    return out


def run_cli(*args: str, subprocess_: bool = False, cwd: Path | None = None) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)`` of ``vlpet-fx ARGS``."""
    if subprocess_:
        res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True,
                             env=ENV, cwd=cwd, timeout=600)
        return res.returncode, res.stdout, res.stderr
    from typer.testing import CliRunner

    from vlpet_fx.cli.main import app

    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        res = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its kind, size and modification time."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def assert_refused(code: int, stderr: str, phrase: str) -> str:
    """Exit 2, exactly one non-blank line on stderr, no traceback, ``phrase`` in it. Returns the line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert len(lines) == 1, stderr[-3000:]
    assert phrase in lines[0], lines[0]
    return lines[0]
