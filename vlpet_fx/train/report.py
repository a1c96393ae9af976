"""``report.json`` of a finished run, read against a strict schema (``vlpet-fx report`` shows it)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import TrainError

MAX_REPORT_BYTES = 16 * 2**20


class RunReport(BaseModel):
    """What ``train`` writes at the end of a run (extra keys are kept, never used)."""

    model_config = ConfigDict(extra="allow", strict=True)

    scores: dict[str, dict[str, float]] | None
    main: dict[str, float]
    trainable_params: int = Field(ge=0)
    patched_params: int = Field(ge=0)  # the patched model's parameter count
    trainable_percent: float = Field(ge=0, le=100)
    steps: int = Field(ge=0)
    rules: str
    bad_rows: list[str] = []
    average: float | None = None
    # vlpet_fx.train.health.position_cosine on the validation examples (None: no example had two positions)
    encoder_position_cos: float | None = Field(default=None, ge=-1.0001, le=1.0001)
    # the --init-from backbone by content: its weights file's sha256 (None: no --init-from, or written before this)
    backbone_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")

    @field_validator("main", "scores", "average", "trainable_percent")
    @classmethod
    def _finite(cls, value):
        def check(v):
            if isinstance(v, dict):
                for x in v.values():
                    check(x)
            elif isinstance(v, float) and not math.isfinite(v):
                raise ValueError("must be a finite number")

        check(value)
        return value


def read_report(run: str | Path) -> RunReport:
    """The report of the run directory ``run``; :class:`TrainError` (one line) if there is none or it is damaged."""
    run = Path(run)
    if not run.exists():
        raise TrainError(f"run directory '{run}' not found: check the path")
    if not run.is_dir():
        raise TrainError(f"'{run}' is a file, not a run directory: give the directory `vlpet-fx train --out` wrote")
    f = run / "report.json"
    if not f.exists():
        raise TrainError(f"'{run}' has no report.json: is it a finished `vlpet-fx train` run?")
    if not f.is_file():
        raise TrainError(f"'{f}' is not a regular file: run the training again")
    try:
        if f.stat().st_size > MAX_REPORT_BYTES:
            raise ValueError(f"larger than {MAX_REPORT_BYTES:,} bytes")
        doc = json.loads(f.read_text(encoding="utf-8"))
        return RunReport.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise TrainError(f"'{f}' is damaged ({where}: {err['msg']}): run the training again") from None
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise TrainError(f"'{f}' is damaged ({reason}): run the training again") from None
