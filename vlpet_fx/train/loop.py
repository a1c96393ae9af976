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
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import VlpetError
from .batching import example_features, pad_pixels, pad_visual, task_prompt, tokenize
from .config import TrainConfig, TrainConfigError, TrainError
from .health import collapse_warning, position_cosine
from .recipe import backbone_type, param_groups, resolve, set_dropout, trains_in_full  # noqa: F401  (set_dropout: public here)
from .sharded import check_distributed, configure_plugin, full, gather_state, unsharded

PAD, EOS = 0, 1


@dataclass
class Split:
    """Tokenised examples of one split, with their visual features (N_i images each, padded per batch)."""

    tasks: list[str]
    inputs: list[str]
    targets: list[str]
    features: list[torch.Tensor]  # per example (K_i, T, F)
    images: list[list]  # raw images (for --on-the-fly)


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


_ARTEFACTS = ("run.json", "tokenizer", "metrics.jsonl", "metrics.csv", "checkpoints", "model", "curves.png",
              "predictions.jsonl", "report.json")
_COMPARED_AS_PATHS = ("init_from", "data", "eval_data")
# options a resumed run may change: they do not change the trajectory (or are its length, or this invocation's)
_MAY_CHANGE = ("out", "resume", "steps", "eval_every", "save_every", "keep_checkpoints", "feature_cache",
               "eval_batch_size", "max_new_tokens", "on_the_fly", "trust_code", "num_beams")


@contextlib.contextmanager
def writing(path: Path):
    """Turn a failed write (disk full, read-only, safetensors' error type) into one line naming ``path``."""
    from ..export.atomic import is_write_error, write_reason

    try:
        yield
    except VlpetError:
        raise
    except Exception as exc:
        if not is_write_error(exc):
            raise
        raise TrainError(f"cannot write '{path}': {write_reason(exc)}") from None


def read_run_record(record: Path) -> dict:
    """``run.json`` as a mapping of option names; :class:`TrainError` if it is damaged."""
    from .config import CONFIG_FIELDS

    try:
        if not record.is_file():
            raise ValueError("not a regular file")
        if record.stat().st_size > 2**20:
            raise ValueError("larger than 1 MiB")
        doc = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else " ".join(str(exc).split())[:200]
        raise TrainError(f"'{record}' is damaged ({reason}): delete it to --resume with the options you give, or "
                         "choose a new --out") from None
    sha = doc.get("backbone_sha256") if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or not set(doc) <= {*CONFIG_FIELDS, "resolved", "backbone_sha256"}
            or not (sha is None or (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)))):
        raise TrainError(f"'{record}' is damaged (not a mapping of training options): delete it to --resume with "
                         "the options you give, or choose a new --out")
    return doc


def _comparable(key: str, value):
    if key in _COMPARED_AS_PATHS and isinstance(value, str):
        return str(Path(value).expanduser().resolve())
    return value


class Trainer:
    def __init__(self, cfg: TrainConfig, console=None, log_every: int = 10):
        if not isinstance(cfg, TrainConfig):
            raise TrainConfigError(f"expected a TrainConfig, got {type(cfg).__name__}")
        cfg.validate()  # again: fields may have been changed after the config was made
        from accelerate import Accelerator

        self.log_every = log_every  # progress lines when the console is not a terminal (0: none)
        self.cfg = cfg
        # cpu=True on a machine without an accelerator: else Accelerate (1.15) sets up no process group under
        # torchrun, and every process would train alone as process 0
        device = getattr(torch, "accelerator", None)  # torch >= 2.6; before it, CUDA is the one that counts here
        has_device = device.is_available() if device is not None else torch.cuda.is_available()
        self.acc = Accelerator(mixed_precision=cfg.precision, gradient_accumulation_steps=1, cpu=not has_device)
        self.console = console
        self.run = Path(cfg.out)
        self.start = 0
        self.committed = False  # this invocation has written run.json (at its first checkpoint or at the end)
        self.resumed = False
        self.created: Path | None = None  # the topmost directory this invocation created for the run
        self.claimed = False  # the directory checks passed: from now on the run directory is this invocation's
        self.kept = False  # a checkpoint (or the finished run) has been written: a failure keeps the run

    def say(self, message: str) -> None:
        if not self.acc.is_main_process:
            return
        if self.console is not None:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)
        else:
            print(message, file=sys.stderr)

    # ---- set-up -----------------------------------------------------------------------------------------------
    def _check_run_dir(self):
        """Read-only checks of ``--out``: a run to resume, a fresh directory, or an error (one line)."""
        from .state import complete_steps

        run, cfg = self.run, self.cfg
        if run.is_symlink() and not run.exists():
            raise TrainError(f"--out '{run}' is a broken symbolic link: remove it or choose another --out")
        if run.exists() and not run.is_dir():
            raise TrainError(f"--out '{run}' is a file, not a directory: choose a directory for the run")
        for p in run.parents:
            if p.exists():
                if not p.is_dir():
                    raise TrainError(f"--out '{run}': '{p}' is a file, not a directory: choose another --out")
                break
        record = run / "run.json"
        has_record = record.exists() or record.is_symlink()
        contents = [p.name for p in run.iterdir()] if run.is_dir() else []
        if not cfg.resume:
            if has_record:
                raise TrainError(f"'{run}' holds another run: pass --resume to continue it, or choose a new --out")
            if contents:
                raise TrainError(f"output directory '{run}' is not empty and holds no run: choose a new --out")
            return
        steps = complete_steps(run) if run.is_dir() else []
        if has_record:
            old = read_run_record(record)
            now = self.cfg.to_dict()
            for k in now:
                if k in _MAY_CHANGE or k not in old:
                    continue
                if _comparable(k, old[k]) != _comparable(k, now[k]):
                    raise TrainError(f"--resume with a different configuration ('{k}' was {old[k]!r}, now "
                                     f"{now[k]!r}); use the original options or a new --out")
            manifest = Path(cfg.init_from) / "model" / "vlpet.json" if cfg.init_from else None
            if old.get("backbone_sha256") and manifest is not None and manifest.is_file():
                if backbone_sha256(Path(cfg.init_from)) != old["backbone_sha256"]:
                    raise TrainError(f"--resume: the --init-from backbone '{cfg.init_from}' is not the one this run "
                                     "started from (its weights' sha256 differs: it was trained again); resume "
                                     "with that backbone, or start a new --out")
        elif contents and not steps:
            raise TrainError(f"output directory '{run}' is not empty and holds no run to resume: choose a new --out")
        elif steps:
            self.say(f"'{run}' has no run.json: resuming without checking the options against the original run's")
        self.resumed = bool(steps)
        if not steps:
            why = "no run" if not has_record else "no complete checkpoint"
            self.say(f"nothing to resume in '{run}' ({why}): starting from step 0")

    def _claim_run_dir(self):
        """Create ``--out`` (remembering what was created) and check that it takes files."""
        if not self.acc.is_main_process:
            return
        run = self.run
        missing = [p for p in [run, *run.parents] if not p.exists()]
        self.claimed = True
        self.created = missing[-1] if missing else None  # set first: a failed mkdir may have made parents
        try:
            run.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=run)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise TrainError(f"cannot write in '{run}': {exc.strerror or exc}; choose a writable --out") from None
        if self.cfg.resume and not self.resumed:
            self._remove_artefacts()  # of an earlier invocation that never reached a checkpoint

    def setup(self):
        import vlpet_fx

        from ..data.tokenizer import build_tokenizer, checkpoint_tokenizer
        from ..vl import FeatureCache, build_vl

        cfg = self.cfg
        self.fsdp = check_distributed(self.acc)
        if cfg.batch_size % (self.acc.num_processes * cfg.grad_accum):
            raise TrainConfigError(f"--batch-size {cfg.batch_size} is not divisible by {self.acc.num_processes} "
                                   f"processes × {cfg.grad_accum} accumulation steps")
        self._check_run_dir()
        self.acc.wait_for_everyone()  # every process has checked before the main one writes anything
        train, self.problems = load_examples(cfg, "train")
        evals, _ = load_examples(cfg, "val")
        if not train:
            raise VlpetError("no training examples: the data file or task list gave no rows")
        if not evals:
            raise VlpetError("no evaluation examples: the evaluation data gave no rows")
        self._claim_run_dir()
        texts = [task_prompt(e.task, e.input) for e in train + evals] + [e.target for e in train + evals]
        if cfg.init_from:
            self.model, self.tok, self.tokenizer_kind = load_backbone(Path(cfg.init_from), texts,
                                                                      trust_code=cfg.trust_code)
        elif uses_own_tokenizer(cfg.text):  # a checkpoint directory with its tokenizer: trained with it
            self.tok, self.tokenizer_kind = checkpoint_tokenizer(cfg.text), "checkpoint"
            self.model = build_vl(cfg.text, cfg.size, visual=cfg.visual, visual_size=cfg.visual_size,
                                  tokenizer=self.tok, tokens_per_image=cfg.tokens_per_image, seed=cfg.seed)
            self._say_unknown(texts)
        else:  # a built-in random model (or a directory without a tokenizer): the task texts' word-level one
            self.tok, self.tokenizer_kind = build_tokenizer(texts + builtin_vocabulary_texts()), "words"
            self.model = build_vl(cfg.text, cfg.size, visual=cfg.visual, visual_size=cfg.visual_size,
                                  vocab_size=len(self.tok), tokens_per_image=cfg.tokens_per_image, seed=cfg.seed)
        self.backbone_sha256 = backbone_sha256(Path(cfg.init_from)) if cfg.init_from else None
        self.base_ref = {"kind": "vl", "spec": "vl", "text": cfg.text, "size": cfg.size, "visual": cfg.visual,
                         "visual_size": cfg.visual_size, "seed": cfg.seed, "tokenizer": self.tokenizer_kind,
                         "vocab_size": self.model.text.get_input_embeddings().num_embeddings,
                         "tokens_per_image": cfg.tokens_per_image,
                         "init_from": str(Path(cfg.init_from).resolve()) if cfg.init_from else None}
        vlpet_fx.patch(self.model, cfg.rules, seed=cfg.seed)
        unmatched = self.model.vlpet_patch.plan.unmatched_warning()
        if unmatched is not None:
            self.say(f"warning: {unmatched}")
        self.recipe = resolve(cfg, backbone_type(self.model.text), full=trains_in_full(self.model.text))
        if self.recipe.dropout is not None:
            self.recipe.dropout_fields = set_dropout(self.model.text, self.recipe.dropout)
        self.summary = vlpet_fx.summary(self.model)
        if self.summary.trainable == 0:
            raise VlpetError(f"rule set '{cfg.rules}' leaves nothing trainable: add rules or `trainable:` entries")
        self.model.visual.eval()
        self.model.to(self.acc.device)
        self.acc.wait_for_everyone()
        # visual features: computed once (main process first, so the others read its cache)
        cache = FeatureCache(self.model, cfg.feature_cache)
        self.splits = {}
        for name, exs in (("train", train), ("val", evals)):
            feats = None
            if not cfg.on_the_fly:
                if self.acc.is_main_process or cfg.feature_cache is None:
                    feats = example_features(cache, exs)
                self.acc.wait_for_everyone()
                if feats is None:
                    feats = example_features(FeatureCache(self.model, cfg.feature_cache), exs)
            self.splits[name] = Split([e.task for e in exs], [task_prompt(e.task, e.input) for e in exs],
                                      [e.target for e in exs], feats or [], [e.images for e in exs])
        self.by_task: dict[str, list[int]] = {}
        for i, t in enumerate(self.splits["train"].tasks):
            self.by_task.setdefault(t, []).append(i)
        self.weights = dict(cfg.tasks) if cfg.data is None else {}
        self.total_steps = cfg.steps
        if cfg.epochs is not None:
            self.total_steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
        r = self.recipe
        # decayed / undecayed by the recipe's grouping: a partition of the trainable parameters by construction
        groups, r.param_groups = param_groups(self.model, r.decay_grouping, r.weight_decay)
        self.opt = torch.optim.AdamW(groups, lr=r.lr, eps=r.adam_eps)
        from transformers import get_scheduler

        names = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
        self.sched = get_scheduler(names[cfg.schedule], self.opt, num_warmup_steps=int(r.warmup * self.total_steps),
                                   num_training_steps=self.total_steps)
        if self.resumed and not self.fsdp:
            self.start = self._load_newest_checkpoint()
        if self.fsdp:
            configure_plugin(self.acc.state.fsdp_plugin, self.model)
        self.ddp_model, self.opt_prepared = self.acc.prepare(self.model, self.opt)
        if self.fsdp:
            from .sharded import fsdp_units

            units = fsdp_units(self.model)
            kinds = sorted({type(u).__name__.removeprefix("FSDP") for u in units[1:]})
            self.say(f"FSDP: {len(units)} shard units over {self.acc.num_processes} processes (the model, "
                     f"{', '.join(kinds) or 'no layers'})")
        if self.resumed and self.fsdp:  # into the sharded parameters and optimizer (each process its shards)
            self.start = self._load_newest_checkpoint()
        self.log = self._open_log()

    def _load_newest_checkpoint(self) -> int:
        """The newest checkpoint that reads back whole; newer damaged ones are removed, saying so."""
        import shutil

        from .state import CheckpointError, complete_steps, load_checkpoint, remove_partial_checkpoints

        if self.acc.is_main_process:
            for name in remove_partial_checkpoints(self.run):
                where = self.run / "checkpoints" / name if name.startswith(("step-", ".step-")) else self.run / name
                self.say(f"removed the partial checkpoint '{where}' of an interrupted run" if "step-" in name
                         else f"removed '{where}', left by an interrupted write")
        self.acc.wait_for_everyone()
        steps = complete_steps(self.run)
        first_error = None
        for step in reversed(steps):
            path = self.run / "checkpoints" / f"step-{step}"
            try:
                start = load_checkpoint(path, self.model, self.opt, self.sched)
            except CheckpointError as exc:
                first_error = first_error or exc
                if step != steps[0]:
                    self.say(f"{exc}; falling back to the checkpoint before it")
                continue
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                for newer in steps:
                    if newer > step:
                        shutil.rmtree(self.run / "checkpoints" / f"step-{newer}", ignore_errors=True)
                        self.say(f"removed the damaged checkpoint step-{newer}")
            self.say(f"resuming from step {start}")
            return start
        raise TrainError(f"no checkpoint of '{self.run}' can be read (newest: {first_error}); move "
                         f"'{self.run / 'checkpoints'}' aside to start again from step 0")

    def _say_unknown(self, texts: list[str]) -> None:
        """A checkpoint's tokenizer is kept as it is: say how many task words it can only spell as unknown."""
        unk = self.tok.unk_token_id
        if unk is None:
            return
        words = sorted(w for w in {w for t in texts for w in t.split()}
                       if unk in self.tok(w, add_special_tokens=False)["input_ids"])
        if words:
            self.say(f"the checkpoint's tokenizer maps {len(words)} task word(s) to its unknown token (first: "
                     f"'{words[0]}'); they are trained as such")

    def _open_log(self):
        from .logs import MetricsLog

        log = MetricsLog(self.run, enabled=self.acc.is_main_process, deferred=not self.resumed)
        if self.resumed:
            with writing(log.path):
                # evaluation rows at the resumed step were logged before its checkpoint only by a periodic
                # evaluation; the end-of-run evaluation of a run that finished there comes after it
                periodic = bool(self.cfg.eval_every) and self.start % self.cfg.eval_every == 0
                dropped = log.resume(self.start, keep_eval_at_step=periodic and self.start < self.total_steps)
            if dropped:
                self.say(f"cut '{log.path}' back to step {self.start} ({dropped} later or damaged lines dropped)")
            self._write_record()
            self.committed = True
        return log

    def _write_record(self):
        """run.json (and the tokenizer): written at the first checkpoint or at the end, never before."""
        from ..io import write_atomic

        if not self.acc.is_main_process:
            return
        with writing(self.run / "run.json"):
            write_atomic(self.run / "run.json", json.dumps({**self.cfg.to_dict(), "resolved": self.recipe.to_dict(),
                                                            "backbone_sha256": self.backbone_sha256}, indent=1))
        with writing(self.run / "tokenizer"):
            self.tok.save_pretrained(str(self.run / "tokenizer"))

    def _commit(self):
        if self.committed:
            return
        self._write_record()
        with writing(self.log.path):
            self.log.flush()
        self.committed = True

    def rollback(self) -> None:
        """After a failure before this invocation's first checkpoint (or, without checkpoints, before the end of
        the run): remove what it wrote (a fresh run only; a resumed run keeps its checkpoints)."""
        import shutil

        if not self.claimed or self.kept or self.resumed or not self.acc.is_main_process:
            return
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        self._remove_artefacts()

    def _remove_artefacts(self) -> None:
        import shutil

        if not self.run.is_dir():
            return
        for p in self.run.iterdir():
            if p.name in _ARTEFACTS or p.name.startswith((".probe-", ".run.json.", ".metrics.", ".model.",
                                                           ".report.json.", ".predictions.jsonl.")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)

    # ---- one optimizer step -----------------------------------------------------------------------------------
    def _inputs(self, split: Split, idx: list[int]):
        dev = self.acc.device
        ids, mask = tokenize(self.tok, [split.inputs[i] for i in idx], dev)
        if self.cfg.on_the_fly:
            pix, vmask = pad_pixels([split.images[i] for i in idx], self.model.image_size, dev)
            return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, visual_mask=vmask)
        feats, vmask = pad_visual([split.features[i] for i in idx], dev)
        return dict(input_ids=ids, attention_mask=mask, visual_features=feats, visual_mask=vmask)

    def train_step(self, step: int) -> float:
        """One optimizer step (``step`` counts from 0). A non-finite loss or gradient stops the run with
        :class:`TrainError` before the optimizer changes any weight."""
        split = self.splits["train"]
        idx = step_indices(self.cfg, step, self.by_task, self.weights)
        labels_all, _ = tokenize(self.tok, [split.targets[i] for i in idx], "cpu")
        pad = self.tok.pad_token_id
        n_tokens = int((labels_all != pad).sum())
        per = len(idx) // self.acc.num_processes
        mine = idx[self.acc.process_index * per:(self.acc.process_index + 1) * per]
        self.ddp_model.train()
        self.model.visual.eval()
        chunks = [mine[i::self.cfg.grad_accum] for i in range(self.cfg.grad_accum)]
        loss_sum = torch.zeros((), device=self.acc.device)
        for j, chunk in enumerate(chunks):
            inputs = self._inputs(split, chunk)
            labels, _ = tokenize(self.tok, [split.targets[i] for i in chunk], self.acc.device)
            labels = labels.masked_fill(labels == pad, -100)
            sync = self.acc.no_sync(self.ddp_model) if j < len(chunks) - 1 else contextlib.nullcontext()
            with sync, self.acc.autocast():
                logits = self.ddp_model(**inputs, labels=labels).logits
                part = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="sum")
                # a token sum over the global token count (DDP averages over processes: scale back up)
                self.acc.backward(part / n_tokens * self.acc.num_processes)
            loss_sum = loss_sum + part.detach()
        total = float(self.acc.reduce(loss_sum, reduction="sum")) / n_tokens
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not math.isfinite(total):
            self._stop(step + 1, "NaN" if math.isnan(total) else "infinite")
        if self.recipe.grad_clip:
            norm = self.acc.clip_grad_norm_(trainable, self.recipe.grad_clip)
        else:
            norm = torch.nn.utils.clip_grad_norm_(trainable, float("inf"))  # measures only: the factor is 1
        # fp16: the gradient scaler skips steps whose scaled gradients overflow; that is not a failure
        if self.cfg.precision != "fp16" and norm is not None and not math.isfinite(float(full(norm))):
            self._stop(step + 1, "NaN", " (its gradient is not finite)")
        self.opt_prepared.step()
        self.sched.step()
        self.opt_prepared.zero_grad(set_to_none=True)
        return total

    def _stop(self, step: int, what: str, detail: str = ""):
        from .state import complete_steps

        self.opt_prepared.zero_grad(set_to_none=True)
        steps = complete_steps(self.run) if self.committed else []
        kept = (f"the last good checkpoint (step {steps[-1]}) is kept, the run is not finished" if steps
                else "no checkpoint was reached, so nothing is kept")
        raise TrainError(f"loss became {what} at step {step}{detail}: {kept}; lower --lr or set --grad-clip and "
                         "train into a new --out")

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
        with unsharded(model, self.fsdp):  # every process, under FSDP
            for s in range(0, len(split.inputs), bs):
                idx = list(range(s, min(s + bs, len(split.inputs))))
                preds += [g.text for g in generate_answers(model, self.tok, self._inputs(split, idx),
                                                           max_new_tokens=self.cfg.max_new_tokens,
                                                           num_beams=self.recipe.num_beams, with_scores=False)]
        scores = {}
        for t in dict.fromkeys(split.tasks):
            ii = [i for i, x in enumerate(split.tasks) if x == t]
            scores[t] = task_scores(t, [preds[i] for i in ii], [split.targets[i] for i in ii])
        self.last_predictions = list(zip(split.inputs, preds, split.targets))
        return scores

    # ---- the run ----------------------------------------------------------------------------------------------
    def fit(self) -> dict:
        from .logs import progress
        from .state import save_checkpoint

        cfg = self.cfg
        log = self.log
        t0, last = time.perf_counter(), self.start
        with progress(self.console, self.total_steps, self.start, enabled=self.acc.is_main_process,
                      every=self.log_every) as bar:
            for step in range(self.start, self.total_steps):
                loss = self.train_step(step)
                done = step + 1
                rate = (done - self.start) / max(time.perf_counter() - t0, 1e-9)
                lr = self.sched.get_last_lr()[0]
                with writing(log.path):
                    log.write({"step": done, "loss": loss, "lr": lr, "steps_per_s": rate})
                bar.update(done, loss=loss, lr=lr, rate=rate)
                if cfg.eval_every and done % cfg.eval_every == 0 and done < self.total_steps:
                    self._eval_and_log(log, done)
                if cfg.save_every and done % cfg.save_every == 0:
                    self.acc.wait_for_everyone()
                    # under FSDP every process gathers the shards (collectives), the main one writes
                    weights, opt_state = gather_state(self.model, self.opt) if self.fsdp else (None, None)
                    if self.acc.is_main_process:
                        self._commit()
                        save_checkpoint(self.run, done, self.model, self.opt, self.sched, cfg.keep_checkpoints,
                                        weights=weights, optimizer_state=opt_state)
                        self.kept = True
                    self.acc.wait_for_everyone()
                last = done
        scores = self._eval_and_log(log, last)
        return self._finish(log, scores)

    def _eval_and_log(self, log, step: int):
        scores = None
        if self.fsdp:
            scores = self.evaluate("val")  # every process: the sharded model generates together
        if self.acc.is_main_process:
            scores = scores if self.fsdp else self.evaluate("val")
            with writing(log.path):
                for task, s in scores.items():
                    log.write({"step": step, "eval": task, **s})
        self.acc.wait_for_everyone()
        return scores

    def _finish(self, log, scores) -> dict:
        report = {}
        # whole parameters for save_patched (every process enters; the run is over: they stay whole)
        with unsharded(self.model, self.fsdp, reshard=False):
            cos = self._position_cosine()  # every process, like the evaluation (the sharded model runs together)
            if self.acc.is_main_process:
                warning = collapse_warning(cos)
                if warning is not None:
                    self.say(f"warning: {warning}")
                report = self._write_outputs(log, scores, cos)
            self.acc.wait_for_everyone()
        return report

    def _position_cosine(self, n: int = 64) -> float:
        """:func:`~vlpet_fx.train.health.position_cosine` on the first ``n`` validation examples."""
        split = self.splits["val"]
        return position_cosine(self.model, self._inputs(split, list(range(min(n, len(split.inputs))))))

    def _write_outputs(self, log, scores, position_cos: float) -> dict:
        from ..export import save_patched
        from ..io import write_atomic
        from .logs import plot_curves
        from .metrics import main_score

        self._commit()
        target = self.run / "model"
        if target.exists() or target.is_symlink():
            import shutil

            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        save_patched(self.model, target, self.base_ref)
        with writing(log.path.with_suffix(".csv")):
            log.to_csv()
        with writing(self.run / "curves.png"):
            plot_curves(log, self.run / "curves.png")
        report = {
            "scores": scores, "main": {t: main_score(t, s) for t, s in (scores or {}).items() if s},
            "trainable_params": self.summary.trainable, "patched_params": self.summary.total,
            "trainable_percent": self.summary.percent, "steps": self.total_steps, "rules": self.cfg.rules,
            "recipe": self.cfg.recipe, "num_beams": self.recipe.num_beams,
            "encoder_position_cos": None if math.isnan(position_cos) else round(position_cos, 4),
            "bad_rows": self.problems, "tokenizer": {"kind": self.tokenizer_kind,
                                                     "class": type(self.tok).__name__, "tokens": len(self.tok)},
            "backbone_sha256": self.backbone_sha256,
        }
        report["average"] = (sum(report["main"].values()) / len(report["main"])) if report["main"] else None
        with writing(self.run / "predictions.jsonl"):
            write_atomic(self.run / "predictions.jsonl", "".join(
                json.dumps({"input": i, "prediction": p, "target": t}) + "\n"
                for i, p, t in getattr(self, "last_predictions", [])))
        # report.json last: it marks the run finished
        with writing(self.run / "report.json"):
            write_atomic(self.run / "report.json", json.dumps(report, indent=1))
        self.kept = True
        return report


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
            out += [task_prompt(e.task, e.input) for e in exs] + [e.target for e in exs]
    return out


def uses_own_tokenizer(text: str) -> bool:
    """A text model given as a checkpoint directory that ships a tokenizer (then trained with it)."""
    from ..data.tokenizer import has_tokenizer
    from ..zoo import list_models

    return text not in {m.name for m in list_models()} and has_tokenizer(text)


def load_backbone(run_dir: Path, texts: list[str], *, trust_code: bool = False):
    """The trained model of an earlier (full fine-tuning) run, as the frozen backbone of this one, with its
    tokenizer and that tokenizer's kind (``words`` or ``checkpoint``)."""
    from transformers import PreTrainedTokenizerFast

    from ..export import load
    from ..export.patched_dir import validate_manifest

    model_dir, tok_dir = run_dir / "model", run_dir / "tokenizer"
    if not (model_dir / "vlpet.json").is_file() or not tok_dir.is_dir():
        raise VlpetError(f"--init-from '{run_dir}' is not a finished training run (no model/ and tokenizer/)")
    model = load(model_dir, trust_code=trust_code)
    kind = getattr(validate_manifest(model_dir).base, "tokenizer", "words")
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
    return model, tok, kind


def backbone_sha256(run_dir: Path) -> str:
    """The identity of an ``--init-from`` backbone: the sha256 of its trained weights file, as its manifest records it
    (``load`` has checked the file against it). A backbone trained again at the same path has another one, so a run's
    report.json names the backbone it was adapted from by content, not by path."""
    from ..export.patched_dir import validate_manifest

    return validate_manifest(run_dir / "model").weights_sha256


def train(cfg: TrainConfig, console=None, log_every: int = 10) -> dict:
    """Run the training ``cfg`` describes. If it fails before its first checkpoint, nothing it wrote is kept
    (a fresh run's directory is as before); a later failure keeps the checkpoints, and the run can be resumed.
    Progress goes to ``console`` (a Rich bar on a terminal, else a plain line every ``log_every`` steps). Returns the
    final summary (report.json) on the main process, ``{}`` on the others."""
    trainer = Trainer(cfg, console, log_every)
    try:
        trainer.setup()
        return trainer.fit()
    except BaseException:
        trainer.rollback()
        raise
