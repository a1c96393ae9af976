"""Training configuration (a dataclass; the CLI fills it, ``run.json`` records it).

Every value is checked when the configuration is made (``TrainConfig(...)`` raises :class:`TrainConfigError`,
one line naming the option and its allowed range), so the CLI and the Python API refuse the same inputs before
anything is built or written.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import VlpetError
from .recipe import GROUPINGS, RECIPES

PRECISIONS = ("no", "bf16", "fp16")
SCHEDULES = ("linear", "cosine", "constant")
MAX_STEPS = 10**9
MAX_BATCH = 2**20
MAX_EXAMPLES = 10**7  # per task
MAX_SEED = 2**32 - 1


class TrainConfigError(VlpetError):
    """A training option is out of range, not finite or of the wrong type."""


class TrainError(VlpetError):
    """A training run cannot go on (non-finite loss, damaged run directory, a write that failed)."""


@dataclass
class TrainConfig:
    out: str = "runs/vl-t5"
    # model
    text: str = "t5"
    size: str = "tiny"
    visual: str = "clip-vit-b-32"
    visual_size: str = "tiny"
    tokens_per_image: int | None = None  # concatenate each image's encoder tokens into this many (None: all)
    rules: str = "vlpet_large"
    init_from: str | None = None  # a run directory whose trained model (full fine-tuning) is the backbone
    # data: built-in tasks with sampling weights, or a JSONL file of the user's own examples
    tasks: list[tuple[str, float]] = field(default_factory=lambda: [("vqa", 1.0), ("gqa", 1.0), ("nlvr", 1.0),
                                                                     ("caption", 1.0)])
    data: str | None = None
    eval_data: str | None = None
    on_bad_rows: str = "stop"
    source: str = "fashion-mnist"
    train_per_task: int = 2000
    eval_per_task: int = 100
    text_only: bool = False  # the control: images blanked, so only the text can be used
    # optimisation
    steps: int = 300
    epochs: float | None = None  # if set, overrides steps: epochs × (training examples / batch size)
    batch_size: int = 32  # global, per optimizer step (split over processes and accumulation steps)
    grad_accum: int = 1
    # recipe (vlpet_fx.train.recipe): every None below is the recipe's value for the backbone; run.json records
    # the resolved values and where each came from
    recipe: str = "quick"  # quick | paper
    lr: float | None = None  # quick: 1e-3; paper: BART 1e-3, T5 3e-4
    schedule: str = "linear"  # linear | cosine | constant
    warmup: float | None = None  # ratio of the steps (0.1)
    weight_decay: float | None = None  # 0.01
    decay_grouping: str | None = None  # paper | ndim (paper for the paper's recipe and rule sets)
    grad_clip: float | None = None  # 0: no clipping (5)
    adam_eps: float | None = None  # 1e-6
    dropout: float | None = None  # the text model's dropout rates (quick: keep its config's; paper: 0.1)
    num_beams: int | None = None  # beams of the evaluations during training (quick: 1, greedy; paper: 5)
    seed: int = 0
    precision: str = "no"  # no | bf16 | fp16
    # bookkeeping
    eval_every: int = 100  # 0: only at the end
    save_every: int = 100  # 0: no checkpoints
    keep_checkpoints: int = 2
    max_new_tokens: int = 16
    eval_batch_size: int = 64
    feature_cache: str | None = None  # directory; None: features computed once in memory for this run
    on_the_fly: bool = False  # compute image features inside every step instead (slow; equals the cached result)
    resume: bool = False
    trust_code: bool = False  # --trust-factory: an --init-from run whose manifest names module:factory may import it

    def __post_init__(self) -> None:
        self.validate()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        return d

    # ---- checks -----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`TrainConfigError` for the first option that is out of range."""
        _int(self, "steps", 1, MAX_STEPS)
        _int(self, "batch_size", 1, MAX_BATCH)
        _int(self, "grad_accum", 1, MAX_BATCH)
        if self.grad_accum > self.batch_size:
            raise TrainConfigError(f"--grad-accum {self.grad_accum} is larger than --batch-size {self.batch_size}: "
                                   "each micro-batch needs at least one example")
        _int(self, "train_per_task", 1, MAX_EXAMPLES)
        _int(self, "eval_per_task", 1, MAX_EXAMPLES)
        _int(self, "eval_every", 0, MAX_STEPS, "0 = only at the end")
        _int(self, "save_every", 0, MAX_STEPS, "0 = no checkpoints")
        _int(self, "keep_checkpoints", 1, 1000)
        _int(self, "max_new_tokens", 1, 512)
        _int(self, "eval_batch_size", 1, MAX_BATCH)
        _int(self, "seed", 0, MAX_SEED)
        if self.tokens_per_image is not None:
            _int(self, "tokens_per_image", 1, 4096)
        if self.lr is not None:
            _float(self, "lr", 0.0, 1e3, low_open=True)
        if self.warmup is not None:
            _float(self, "warmup", 0.0, 1.0, note="a fraction of the steps")
        if self.weight_decay is not None:
            _float(self, "weight_decay", 0.0, 1e3)
        if self.grad_clip is not None:
            _float(self, "grad_clip", 0.0, 1e9, note="0 = no clipping")
        if self.adam_eps is not None:
            _float(self, "adam_eps", 0.0, 1.0, low_open=True)
        if self.dropout is not None:
            _float(self, "dropout", 0.0, 1.0, high_open=True)
        if self.num_beams is not None:
            _int(self, "num_beams", 1, 16)
        if self.epochs is not None:
            _float(self, "epochs", 0.0, 1e6, low_open=True)
        for name, allowed in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("on_bad_rows", ("stop", "skip")),
                              ("recipe", RECIPES), ("decay_grouping", GROUPINGS)):
            value = getattr(self, name)
            if name == "decay_grouping" and value is None:
                continue
            if value not in allowed:
                raise TrainConfigError(f"{_opt(name)} {value!r} is not one of {', '.join(allowed)}")
        for name in ("out", "text", "size", "visual", "visual_size", "rules", "source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip() or "\x00" in value:
                raise TrainConfigError(f"{_opt(name)} must be a non-empty text, got {value!r}")
        for name in ("init_from", "data", "eval_data", "feature_cache"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip() or "\x00" in value):
                raise TrainConfigError(f"{_opt(name)} must be a path, got {value!r}")
        for name in ("text_only", "on_the_fly", "resume"):
            if not isinstance(getattr(self, name), bool):
                raise TrainConfigError(f"{_opt(name)} must be true or false, got {getattr(self, name)!r}")
        self._validate_tasks()

    def _validate_tasks(self) -> None:
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise TrainConfigError("--task: give at least one task (NAME or NAME:WEIGHT)")
        seen = set()
        for item in self.tasks:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise TrainConfigError(f"--task: each task is a (name, weight) pair, got {item!r}")
            name, weight = item
            if not isinstance(name, str) or not name.strip():
                raise TrainConfigError(f"--task: a task name must be a non-empty text, got {name!r}")
            if name in seen:
                raise TrainConfigError(f"--task {name} is given twice: give each task once, with its weight")
            seen.add(name)
            if (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight)
                    or not 0 < weight <= 1e6):
                raise TrainConfigError(f"--task {name}:{weight}: the weight must be a finite number > 0 "
                                       "(and at most 1e6)")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(cfg, name: str, low: int, high: int, note: str = "") -> None:
    value = getattr(cfg, name)
    extra = f"; {note}" if note else ""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TrainConfigError(f"{_opt(name)} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise TrainConfigError(f"{_opt(name)} {value} is out of range: give a whole number from {low:,} to "
                               f"{high:,}{extra}")


def _float(cfg, name: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
           note: str = "") -> None:
    value = getattr(cfg, name)
    extra = f"; {note}" if note else ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TrainConfigError(f"{_opt(name)} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise TrainConfigError(f"{_opt(name)} {value} is not a finite number: give a number "
                               f"{'>' if low_open else '>='} {low:g}{extra}")
    if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
        lo = f"> {low:g}" if low_open else f">= {low:g}"
        hi = f"< {high:g}" if high_open else f"<= {high:g}"
        raise TrainConfigError(f"{_opt(name)} {value:g} is out of range: give a number {lo} and {hi}{extra}")


CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))
