"""Training configuration (a dataclass; the CLI fills it, ``run.json`` records it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    lr: float = 1e-3
    schedule: str = "linear"  # linear | cosine | constant
    warmup: float = 0.1  # ratio of the steps
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    dropout: float | None = None  # override the text model's dropout rates (None: keep its config's)
    seed: int = 0
    precision: str = "no"  # no | bf16 | fp16
    # bookkeeping
    eval_every: int = 100
    save_every: int = 100
    keep_checkpoints: int = 2
    max_new_tokens: int = 16
    eval_batch_size: int = 64
    feature_cache: str | None = None  # directory; None: features computed once in memory for this run
    on_the_fly: bool = False  # compute image features inside every step instead (slow; equals the cached result)
    resume: bool = False
    trust_code: bool = False  # --trust-factory: an --init-from run whose manifest names module:factory may import it

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tasks"] = [list(t) for t in self.tasks]
        return d
