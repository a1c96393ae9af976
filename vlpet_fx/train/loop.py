"""``train``: multi-task training of a patched VL model with Hugging Face Accelerate (one process, torchrun or
``accelerate launch``: the same code).

Determinism: the examples of optimizer step ``s`` are drawn from a generator seeded by ``(seed, s)``; every
process computes the whole global batch's indices and takes its slice, and the loss is a token sum divided by
the global batch's token count. So N processes at a global batch B follow the same trajectory as one process at
B, and a resumed run follows the same trajectory as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import VlpetError
from .config import TrainConfig
from .state import latest_checkpoint, load_checkpoint, save_checkpoint

PAD, EOS = 0, 1


@dataclass
class Split:
    """Tokenised examples of one split, with their visual features (N_i images each, padded per batch)."""

    tasks: list[str]
    inputs: list[str]
    targets: list[str]
    features: list[torch.Tensor]  # per example (K_i, T, F)
    images: list[list]  # raw images (for --on-the-fly)


def _prefix(task: str, text: str) -> str:
    return f"{task}: {text}"


def load_examples(cfg: TrainConfig, split: str):
    from ..data.jsonl import load_jsonl
    from ..data.tasks import build_task, text_only

    problems: list[str] = []
    if cfg.data is not None:
        path = cfg.data if split == "train" else (cfg.eval_data or cfg.data)
        examples, problems = load_jsonl(path, on_error=cfg.on_bad_rows)
    else:
        n = cfg.train_per_task if split == "train" else cfg.eval_per_task
        examples = [e for name, _ in cfg.tasks for e in build_task(name, split, n, source=cfg.source, seed=cfg.seed)]
    if cfg.text_only:
        examples = text_only(examples)
    return examples, problems


def _batch_text(tok, texts: list[str], device):
    enc = tok(texts, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _pad_visual(feats: list[torch.Tensor], device):
    """(K_i, T, F) per example → (B, Kmax·T, F) and an image mask (B, Kmax)."""
    k = max(f.shape[0] for f in feats)
    t, d = feats[0].shape[1], feats[0].shape[2]
    out = torch.zeros(len(feats), k, t, d)
    mask = torch.zeros(len(feats), k, dtype=torch.long)
    for i, f in enumerate(feats):
        out[i, : f.shape[0]] = f
        mask[i, : f.shape[0]] = 1
    return out.flatten(1, 2).to(device), mask.to(device)


def _pixels(images: list[list], size: int, device):
    from ..vl.model import to_pixels

    k = max(len(ims) for ims in images)
    blank = torch.zeros(3, size, size)
    rows, mask = [], torch.zeros(len(images), k, dtype=torch.long)
    for i, ims in enumerate(images):
        px = list(to_pixels(ims, size))
        mask[i, : len(px)] = 1
        rows.append(torch.stack(px + [blank] * (k - len(px))))
    return torch.stack(rows).to(device), mask.to(device)


def step_indices(cfg: TrainConfig, step: int, by_task: dict[str, list[int]], weights: dict[str, float]) -> list[int]:
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    names = [t for t in by_task if by_task[t]]
    w = torch.tensor([weights.get(t, 1.0) for t in names], dtype=torch.float64)
    picks = torch.multinomial(w / w.sum(), cfg.batch_size, replacement=True, generator=g)
    out = []
    for p in picks.tolist():
        pool = by_task[names[p]]
        out.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, console=None, log_every: int = 10):
        from accelerate import Accelerator

        self.log_every = log_every  # progress lines when the console is not a terminal (0: none)
        self.cfg = cfg
        self.acc = Accelerator(mixed_precision=cfg.precision, gradient_accumulation_steps=1)
        self.console = console
        self.run = Path(cfg.out)

    # ---- set-up -----------------------------------------------------------------------------------------------
    def _check_run_dir(self):
        record = self.run / "run.json"
        if record.exists() and not self.cfg.resume:
            raise VlpetError(f"'{self.run}' holds another run: pass --resume to continue it, or choose a new --out")
        if self.cfg.resume and record.exists():
            old = json.loads(record.read_text())
            keep = {k: v for k, v in old.items() if k not in ("resume", "steps", "eval_every", "save_every")}
            now = {k: v for k, v in self.cfg.to_dict().items() if k in keep}
            if keep != now:
                diff = next(k for k in keep if keep[k] != now.get(k))
                raise VlpetError(f"--resume with a different configuration ('{diff}' was {keep[diff]!r}); use the "
                                 "original options or a new --out")
        if self.run.exists() and not record.exists() and any(self.run.iterdir()):
            raise VlpetError(f"output directory '{self.run}' is not empty and holds no run: choose a new --out")

    def setup(self):
        import vlpet_fx

        from ..data.tokenizer import build_tokenizer
        from ..vl import FeatureCache, build_vl

        cfg = self.cfg
        if self.acc.distributed_type.name in ("FSDP", "DEEPSPEED"):  # checkpoints read whole parameters
            raise VlpetError(f"train runs on one process or DDP, not {self.acc.distributed_type.name}: launch with "
                             "torchrun or `accelerate launch` without --use_fsdp/--use_deepspeed (see README)")
        if cfg.batch_size % (self.acc.num_processes * cfg.grad_accum):
            raise VlpetError(f"--batch-size {cfg.batch_size} is not divisible by {self.acc.num_processes} processes × "
                             f"{cfg.grad_accum} accumulation steps")
        if cfg.precision not in ("no", "bf16", "fp16"):
            raise VlpetError(f"unknown precision '{cfg.precision}': use no, bf16 or fp16")
        self._check_run_dir()
        self.acc.wait_for_everyone()  # every process has checked before the main one writes anything
        train, self.problems = load_examples(cfg, "train")
        evals, _ = load_examples(cfg, "val")
        if not train:
            raise VlpetError("no training examples: the data file or task list gave no rows")
        texts = [_prefix(e.task, e.input) for e in train + evals] + [e.target for e in train + evals]
        if cfg.init_from:
            self.model, self.tok = load_backbone(Path(cfg.init_from), texts)
        else:
            self.tok = build_tokenizer(texts + builtin_vocabulary_texts())
            self.model = build_vl(cfg.text, cfg.size, visual=cfg.visual, visual_size=cfg.visual_size,
                                  vocab_size=len(self.tok), tokens_per_image=cfg.tokens_per_image, seed=cfg.seed)
        self.base_ref = {"kind": "vl", "spec": "vl", "text": cfg.text, "size": cfg.size, "visual": cfg.visual,
                         "visual_size": cfg.visual_size, "vocab_size": len(self.tok), "seed": cfg.seed,
                         "tokens_per_image": cfg.tokens_per_image,
                         "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None}
        vlpet_fx.patch(self.model, cfg.rules, seed=cfg.seed)
        if cfg.dropout is not None:
            set_dropout(self.model.text, cfg.dropout)
        self.summary = vlpet_fx.summary(self.model)
        if self.summary.trainable == 0:
            raise VlpetError(f"rule set '{cfg.rules}' leaves nothing trainable: add rules or `trainable:` entries")
        self.model.visual.eval()
        self.model.to(self.acc.device)
        if self.acc.is_main_process:
            self.run.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        # visual features: computed once (main process first, so the others read its cache)
        cache = FeatureCache(self.model, cfg.feature_cache)
        self.splits = {}
        for name, exs in (("train", train), ("val", evals)):
            feats = None
            if not cfg.on_the_fly:
                if self.acc.is_main_process or cfg.feature_cache is None:
                    feats = _features(cache, exs)
                self.acc.wait_for_everyone()
                if feats is None:
                    feats = _features(FeatureCache(self.model, cfg.feature_cache), exs)
            self.splits[name] = Split([e.task for e in exs], [_prefix(e.task, e.input) for e in exs],
                                      [e.target for e in exs], feats or [], [e.images for e in exs])
        self.by_task: dict[str, list[int]] = {}
        for i, t in enumerate(self.splits["train"].tasks):
            self.by_task.setdefault(t, []).append(i)
        self.weights = dict(cfg.tasks) if cfg.data is None else {}
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.dim() <= 1]
        assert len(decay) + len(no_decay) == len(params)
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=1e-6)
        from transformers import get_scheduler

        names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
        if cfg.schedule not in names:
            raise VlpetError(f"unknown schedule '{cfg.schedule}': use linear, cosine or constant")
        self.sched = get_scheduler(names[cfg.schedule], self.opt, num_warmup_steps=int(cfg.warmup * self.total_steps),
                                   num_training_steps=self.total_steps)
        self.start = 0
        ckpt = latest_checkpoint(self.run) if cfg.resume else None
        if ckpt is not None:
            self.start = load_checkpoint(ckpt, self.model, self.opt, self.sched)
        self.ddp_model, self.opt_prepared = self.acc.prepare(self.model, self.opt)
        if self.acc.is_main_process:
            (self.run / "run.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            self.tok.save_pretrained(str(self.run / "tokenizer"))

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _inputs(self, split: Split, idx: list[int]):
        dev = self.acc.device
        ids, mask = _batch_text(self.tok, [split.inputs[i] for i in idx], dev)
        if self.cfg.on_the_fly:
            pix, vmask = _pixels([split.images[i] for i in idx], self.model.image_size, dev)
            return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, visual_mask=vmask)
        feats, vmask = _pad_visual([split.features[i] for i in idx], dev)
        return dict(input_ids=ids, attention_mask=mask, visual_features=feats, visual_mask=vmask)

    def train_step(self, step: int) -> float:
        split = self.splits["train"]
        idx = step_indices(self.cfg, step, self.by_task, self.weights)
        labels_all, _ = _batch_text(self.tok, [split.targets[i] for i in idx], "cpu")
        n_tokens = int((labels_all != PAD).sum())
        per = len(idx) // self.acc.num_processes
        mine = idx[self.acc.process_index * per:(self.acc.process_index + 1) * per]
        self.ddp_model.train()
        self.model.visual.eval()
        chunks = [mine[i::self.cfg.grad_accum] for i in range(self.cfg.grad_accum)]
        loss_sum = torch.zeros((), device=self.acc.device)
        for j, chunk in enumerate(chunks):
            inputs = self._inputs(split, chunk)
            labels, _ = _batch_text(self.tok, [split.targets[i] for i in chunk], self.acc.device)
            labels = labels.masked_fill(labels == PAD, -100)
            sync = self.acc.no_sync(self.ddp_model) if j < len(chunks) - 1 else contextlib.nullcontext()
            with sync, self.acc.autocast():
                logits = self.ddp_model(**inputs, labels=labels).logits
                part = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")
                # a token sum over the global token count (DDP averages over processes: scale back up)
                self.acc.backward(part / n_tokens * self.acc.num_processes)
            loss_sum = loss_sum + part.detach()
        if self.cfg.grad_clip:
            self.acc.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.grad_clip)
        self.opt_prepared.step()
        self.sched.step()
        self.opt_prepared.zero_grad(set_to_none=True)
        total = self.acc.reduce(loss_sum, reduction="sum")
        return float(total) / n_tokens

    # ---- evaluation -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split_name: str = "val") -> dict[str, dict[str, float]]:
        from ..infer.generate import generate_answers
        from .metrics import task_scores

        split = self.splits[split_name]
        model = self.model
        model.eval()
        preds: list[str] = []
        bs = self.cfg.eval_batch_size
        for s in range(0, len(split.inputs), bs):
            idx = list(range(s, min(s + bs, len(split.inputs))))
            preds += [g.text for g in generate_answers(model, self.tok, self._inputs(split, idx),
                                                       max_new_tokens=self.cfg.max_new_tokens, with_scores=False)]
        scores = {}
        for t in dict.fromkeys(split.tasks):
            ii = [i for i, x in enumerate(split.tasks) if x == t]
            scores[t] = task_scores(t, [preds[i] for i in ii], [split.targets[i] for i in ii])
        self.last_predictions = list(zip(split.inputs, preds, split.targets))
        return scores

    # ---- the run ----------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from .logs import MetricsLog, progress

        cfg = self.cfg
        log = MetricsLog(self.run, enabled=self.acc.is_main_process)
        t0, last = time.perf_counter(), self.start
        with progress(self.console, self.total_steps, self.start, enabled=self.acc.is_main_process,
                      every=self.log_every) as bar:
            for step in range(self.start, self.total_steps):
                loss = self.train_step(step)
                done = step + 1
                rate = (done - self.start) / max(time.perf_counter() - t0, 1e-9)
                lr = self.sched.get_last_lr()[0]
                log.write({"step": done, "loss": loss, "lr": lr, "steps_per_s": rate})
                bar.update(done, loss=loss, lr=lr, rate=rate)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
                    self._eval_and_log(log, done)
                if cfg.save_every and done % cfg.save_every == 0:
                    self.acc.wait_for_everyone()
                    if self.acc.is_main_process:
                        save_checkpoint(self.run, done, self.model, self.opt, self.sched, cfg.keep_checkpoints)
                    self.acc.wait_for_everyone()
                last = done
        scores = self._eval_and_log(log, last)
        return self._finish(log, scores)

    def _eval_and_log(self, log, step: int):
        scores = None
        if self.acc.is_main_process:
            scores = self.evaluate("val")
            for task, s in scores.items():
                log.write({"step": step, "eval": task, **s})
        self.acc.wait_for_everyone()
        return scores

    def _finish(self, log, scores) -> dict:
        from ..export import save_patched
        from ..export.atomic import check_out_dir
        from .logs import plot_curves

        report = {}
        if self.acc.is_main_process:
            from .metrics import main_score

            target = self.run / "model"
            if target.exists():
                import shutil

                shutil.rmtree(target)
            check_out_dir(target)
            save_patched(self.model, target, self.base_ref)
            log.to_csv()
            plot_curves(log, self.run / "curves.png")
            report = {
                "scores": scores, "main": {t: main_score(t, s) for t, s in (scores or {}).items() if s},
                "trainable_params": self.summary.trainable, "patched_params": self.summary.total,
                "trainable_percent": self.summary.percent, "steps": self.total_steps, "rules": self.cfg.rules,
                "bad_rows": self.problems,
            }
            report["average"] = (sum(report["main"].values()) / len(report["main"])) if report["main"] else None
            (self.run / "report.json").write_text(json.dumps(report, indent=1))
            (self.run / "predictions.jsonl").write_text("".join(
                json.dumps({"input": i, "prediction": p, "target": t}) + "\n"
                for i, p, t in getattr(self, "last_predictions", [])))
        self.acc.wait_for_everyone()
        return report


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Every dropout of the model: nn.Dropout modules and attention modules' float ``dropout`` rates."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = p


def builtin_vocabulary_texts() -> list[str]:
    """Texts of every built-in task on every available image source: one tokenizer for all of them, so a
    backbone trained on one group of tasks/images can be adapted to another."""
    from ..data.errors import DataError
    from ..data.images import list_sources
    from ..data.tasks import build_task, list_tasks

    out = []
    for src in list_sources():
        for task in list_tasks():
            try:
                exs = build_task(task, "train", 400, source=src, seed=0)
            except DataError:
                continue
            out += [_prefix(e.task, e.input) for e in exs] + [e.target for e in exs]
    return out


def load_backbone(run_dir: Path, texts: list[str]):
    """The trained model of an earlier (full fine-tuning) run, as the frozen backbone of this one."""
    from transformers import PreTrainedTokenizerFast

    from ..export import load

    model_dir, tok_dir = run_dir / "model", run_dir / "tokenizer"
    if not (model_dir / "vlpet.json").is_file() or not tok_dir.is_dir():
        raise VlpetError(f"--init-from '{run_dir}' is not a finished training run (no model/ and tokenizer/)")
    model = load(model_dir)
    if model.vlpet_patch.attached:
        raise VlpetError(f"--init-from '{run_dir}' was trained with PET modules; give a full fine-tuning run as backbone")
    del model.vlpet_patch
    model.requires_grad_(True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    unknown = sorted({w for t in texts for w, i in zip(tok.tokenize(t), tok.convert_tokens_to_ids(tok.tokenize(t)))
                      if i == tok.unk_token_id})
    if unknown:
        raise VlpetError(f"the backbone's tokenizer does not know '{unknown[0]}' ({len(unknown)} words): train the "
                         "backbone on data with the same vocabulary")
    return model, tok


def _features(cache, examples) -> list[torch.Tensor]:
    flat = [im for e in examples for im in e.images]
    feats = cache.features(flat) if flat else torch.zeros(0)
    out, i = [], 0
    for e in examples:
        out.append(feats[i:i + len(e.images)])
        i += len(e.images)
    return out


def train(cfg: TrainConfig, console=None, log_every: int = 10) -> dict:
    """Run ``cfg``; progress on ``console`` (a Rich bar on a terminal, else a plain line every ``log_every``
    steps). Returns the final summary (report.json) on the main process, ``{}`` on the others."""
    trainer = Trainer(cfg, console, log_every)
    trainer.setup()
    return trainer.fit()
