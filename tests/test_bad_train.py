"""Bad training options, run directories and writes (issue 11, classes 5-7): one row per bad input, each
refused with exit 2 and one line naming the problem, with nothing written. Then the runs themselves: a
non-finite loss stops the run, a failure before the first checkpoint keeps nothing, and `--resume` survives
damaged checkpoints, a damaged metrics tail, partial checkpoints and a moved run directory."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from badinput import assert_refused, run_cli, snapshot, tiny_args

from vlpet_fx.train import TrainConfig
from vlpet_fx.train.config import TrainConfigError


# ------------------------------------------------------------------------------------------ option values
OPTION_ROWS = [
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--steps", "-3"], "--steps -3 is out of range"),
    (["--lr", "0"], "--lr 0 is out of range"),
    (["--lr", "-1e-3"], "--lr -0.001 is out of range"),
    (["--lr", "nan"], "--lr nan is not a finite number"),
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--grad-clip", "nan"], "--grad-clip nan is not a finite number"),
    (["--grad-clip", "inf"], "--grad-clip inf is not a finite number"),
    (["--grad-clip", "-1"], "--grad-clip -1 is out of range"),
    (["--warmup", "-0.1"], "--warmup -0.1 is out of range"),
    (["--warmup", "1.5"], "--warmup 1.5 is out of range"),
    (["--warmup", "nan"], "--warmup nan is not a finite number"),
    (["--weight-decay", "-0.01"], "--weight-decay -0.01 is out of range"),
    (["--weight-decay", "inf"], "--weight-decay inf is not a finite number"),
    (["--task", "vqa:0"], "the weight must be a finite number > 0"),
    (["--task", "vqa:-2"], "the weight must be a finite number > 0"),
    (["--task", "vqa:nan"], "the weight must be a finite number > 0"),
    (["--task", "vqa:inf"], "the weight must be a finite number > 0"),
    (["--task", "vqa", "--task", "vqa:2"], "--task vqa is given twice"),
    (["--eval-every", "-1"], "--eval-every -1 is out of range"),
    (["--save-every", "-5"], "--save-every -5 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--batch-size", "-8"], "--batch-size -8 is out of range"),
    (["--grad-accum", "0"], "--grad-accum 0 is out of range"),
    (["--grad-accum", "16"], "--grad-accum 16 is larger than --batch-size 8"),
    (["--batch-size", "6", "--grad-accum", "4"], "--batch-size 6 is not divisible"),
    (["--dropout", "1.0"], "--dropout 1 is out of range"),
    (["--dropout", "-0.1"], "--dropout -0.1 is out of range"),
    (["--dropout", "nan"], "--dropout nan is not a finite number"),
    (["--precision", "fp32"], "--precision 'fp32' is not one of no, bf16, fp16"),
    (["--precision", ""], "--precision '' is not one of"),
    (["--schedule", "exponential"], "--schedule 'exponential' is not one of linear, cosine, constant"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--epochs", "nan"], "--epochs nan is not a finite number"),
    (["--train-per-task", "0"], "--train-per-task 0 is out of range"),
    (["--eval-per-task", "0"], "--eval-per-task 0 is out of range"),
    (["--tokens-per-image", "0"], "--tokens-per-image 0 is out of range"),
    (["--on-bad-rows", "ignore"], "--on-bad-rows must be stop or skip"),
]


@pytest.mark.parametrize("args, phrase", OPTION_ROWS, ids=[" ".join(a) for a, _ in OPTION_ROWS])
def test_bad_option_refused_before_anything_is_written(tmp_path, args, phrase):
    before = snapshot(tmp_path)
    code, _, err = run_cli("train", *tiny_args(args, **{"--out": str(tmp_path / "run")}))
    assert_refused(code, err, phrase)
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


# options checked in the real CLI process (parsing of "nan"/"inf" by the command line itself)
@pytest.mark.parametrize("args, phrase", [
    (["--grad-clip", "nan"], "--grad-clip nan is not a finite number"),
    (["--lr", "inf"], "--lr inf is not a finite number"),
    (["--task", "vqa:0"], "the weight must be a finite number > 0"),
])
def test_bad_option_in_a_real_process(tmp_path, args, phrase):
    code, _, err = run_cli("train", *tiny_args(args, **{"--out": str(tmp_path / "run")}), subprocess_=True)
    assert_refused(code, err, phrase)
    assert list(tmp_path.iterdir()) == []


def test_python_api_gets_the_same_checks():
    with pytest.raises(TrainConfigError, match="--grad-clip nan is not a finite number"):
        TrainConfig(grad_clip=float("nan"))
    with pytest.raises(TrainConfigError, match="--steps must be a whole number"):
        TrainConfig(steps=2.5)
    with pytest.raises(TrainConfigError, match="--resume must be true or false"):
        TrainConfig(resume="yes")
    cfg = TrainConfig(steps=3)
    cfg.lr = -1.0  # changed after it was made: the trainer checks again
    from vlpet_fx.train import Trainer

    with pytest.raises(TrainConfigError, match="--lr -1 is out of range"):
        Trainer(cfg)
    # the edges of every range are accepted
    TrainConfig(steps=1, lr=1e-9, grad_clip=0.0, warmup=0.0, weight_decay=0.0, dropout=0.0, eval_every=0,
                save_every=0, batch_size=1, grad_accum=1, seed=0, tasks=[("vqa", 1e-6)])


# ------------------------------------------------------------------------------------- run directories
def _make(tmp: Path, kind: str) -> Path:
    """The ``--out`` of a row."""
    out = tmp / "out"
    if kind == "file":
        out.write_text("a file\n")
    elif kind == "under-file":
        (tmp / "f").write_text("a file\n")
        out = tmp / "f" / "run"
    elif kind == "nonempty":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    elif kind == "taken":
        out.mkdir()
        (out / "run.json").write_text("{}")
    elif kind in ("damaged-record", "record-list", "record-unknown-key", "record-bad-backbone"):
        out.mkdir()
        text = {"damaged-record": '{"steps": 3, "lr', "record-list": "[1, 2]",
                "record-unknown-key": '{"steps": 3, "__class__": "os.system"}',
                "record-bad-backbone": '{"steps": 3, "backbone_sha256": ["not", "a", "digest"]}'}[kind]
        (out / "run.json").write_text(text)
    elif kind == "other-config":
        out.mkdir()
        (out / "run.json").write_text(json.dumps(TrainConfig(out=str(out), **{**_fast_config(), "lr": 0.5}).to_dict()))
    elif kind == "nonempty-resume":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    elif kind == "read-only":
        out = Path("/sys/vlpet-fx-h3-test-run")
    elif kind == "dangling":
        out.symlink_to(tmp / "nowhere")
    return out


DIR_ROWS = [
    ("file", [], "is a file, not a directory"),
    ("under-file", [], "is a file, not a directory"),
    ("nonempty", [], "is not empty and holds no run"),
    ("taken", [], "holds another run: pass --resume"),
    ("damaged-record", ["--resume"], "run.json' is damaged"),
    ("record-list", ["--resume"], "run.json' is damaged (not a mapping of training options)"),
    ("record-unknown-key", ["--resume"], "run.json' is damaged"),
    ("record-bad-backbone", ["--resume"], "run.json' is damaged (not a mapping of training options)"),
    ("other-config", ["--resume"], "--resume with a different configuration ('lr' was 0.5"),
    ("nonempty-resume", ["--resume"], "is not empty and holds no run to resume"),
    ("read-only", [], "cannot write in '/sys/vlpet-fx-h3-test-run'"),
    ("dangling", [], "is a broken symbolic link"),
]


@pytest.mark.parametrize("kind, args, phrase", DIR_ROWS, ids=[r[0] for r in DIR_ROWS])
def test_bad_run_directory(tmp_path, kind, args, phrase):
    out = _make(tmp_path, kind)
    before = snapshot(tmp_path)
    code, _, err = run_cli("train", *tiny_args(args, **{"--out": str(out)}))
    assert_refused(code, err, phrase)
    assert snapshot(tmp_path) == before
    assert not Path("/sys/vlpet-fx-h3-test-run").exists()


def test_bad_run_directory_in_a_real_process(tmp_path):
    out = _make(tmp_path, "file")
    code, _, err = run_cli("train", *tiny_args([], **{"--out": str(out)}), subprocess_=True)
    assert_refused(code, err, "is a file, not a directory")
    assert out.read_text() == "a file\n"


# ------------------------------------------------------------------------------------------- report.json
REPORT = {"scores": {"vqa": {"exact_match": 50.0}}, "main": {"vqa": 50.0}, "trainable_params": 10,
          "patched_params": 100, "trainable_percent": 10.0, "steps": 3, "rules": "vlpet_large", "bad_rows": [],
          "average": 50.0}
REPORT_ROWS = [
    ("[]", "report.json' is damaged"),
    ("{", "report.json' is damaged"),
    ('"text"', "report.json' is damaged"),
    (json.dumps({**REPORT, "main": "high"}), "report.json' is damaged (main:"),
    (json.dumps({**REPORT, "main": {"vqa": "high"}}), "report.json' is damaged (main.vqa:"),
    (json.dumps({k: v for k, v in REPORT.items() if k != "trainable_percent"}), "(trainable_percent: Field required"),
    (json.dumps({**REPORT, "trainable_percent": "10"}), "(trainable_percent:"),
    (json.dumps({**REPORT, "average": float("nan")}), "(average:"),
    (json.dumps({**REPORT, "scores": [1, 2]}), "(scores:"),
    (json.dumps({**REPORT, "encoder_position_cos": 3.0}), "(encoder_position_cos:"),
    (json.dumps({**REPORT, "encoder_position_cos": "0.5"}), "(encoder_position_cos:"),
    (json.dumps({**REPORT, "backbone_sha256": "not-a-digest"}), "(backbone_sha256:"),
    ("[" * 100000, "report.json' is damaged"),
]


@pytest.mark.parametrize("text, phrase", REPORT_ROWS, ids=[f"report{i}" for i in range(len(REPORT_ROWS))])
def test_damaged_report(tmp_path, text, phrase):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(text)
    code, _, err = run_cli("report", str(tmp_path / "run"))
    assert_refused(code, err, phrase)


@pytest.mark.parametrize("kind, phrase", [("missing", "not found"), ("file", "is a file, not a run directory"),
                                          ("no-report", "has no report.json"),
                                          ("report-dir", "report.json' is not a regular file")])
def test_report_names_what_the_path_is(tmp_path, kind, phrase):
    run = tmp_path / "run"
    if kind == "file":
        run.write_text("x")
    elif kind == "no-report":
        run.mkdir()
    elif kind == "report-dir":
        (run / "report.json").mkdir(parents=True)
    code, _, err = run_cli("report", str(run))
    assert_refused(code, err, phrase)


def test_report_reads_a_good_report(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps(REPORT))
    code, out, err = run_cli("report", str(tmp_path / "run"))
    assert code == 0, err
    assert "50.0" in out and "10.00" in out


@pytest.mark.parametrize("cos, warned", [(None, False), (0.4, False), (0.991, True)])
def test_report_warns_about_a_collapsed_encoder(tmp_path, cos, warned):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "report.json").write_text(json.dumps({**REPORT, "encoder_position_cos": cos}))
    code, out, err = run_cli("report", str(tmp_path / "run"), "--format", "json")
    assert code == 0, err
    assert json.loads(out)["runs"][0]["encoder_position_cos"] == cos
    assert ("same vector (mean cosine 0.991" in err) is warned


# ------------------------------------------------------------------------------------------------- writers
def test_atomic_writes_follow_the_umask(tmp_path):
    from vlpet_fx.export.atomic import atomic_dir
    from vlpet_fx.io import write_atomic

    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors' temp files are 0600
            (tmp / "sub").mkdir()
        write_atomic(tmp_path / "f.json", "{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "d") == 0o750 and mode(tmp_path / "d" / "sub") == 0o750
    assert mode(tmp_path / "d" / "w.safetensors") == 0o640
    assert mode(tmp_path / "f.json") == 0o640


def test_atomic_dir_disk_full_is_one_line_naming_the_path(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from vlpet_fx.errors import ExportError
    from vlpet_fx.export.atomic import atomic_dir, check_out_dir

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with pytest.raises(ExportError) as ei:
        with atomic_dir(tmp_path / "d") as tmp:
            full(tmp)
    msg = str(ei.value)
    assert f"cannot write '{tmp_path / 'd'}'" in msg and "No space left on device" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # no temporary directory left
    with pytest.raises(ExportError, match="cannot write .*No space left on device"):
        with atomic_dir(tmp_path / "e"):
            raise OSError(28, "No space left on device")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        check_out_dir(tmp_path / "file")


# ------------------------------------------------------------------------------------------- training runs
FAST = {"--source": "digits", "--task": "vqa", "--train-per-task": "16", "--eval-per-task": "4",
        "--batch-size": "8", "--eval-every": "0"}


def train(out: Path, *args: str, check: bool = True):
    code, stdout, err = run_cli("train", *tiny_args(list(args), **{"--out": str(out), **FAST}))
    if check:
        assert code == 0, err[-3000:]
    return code, stdout, err


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    code, _, err = train(run, "--steps", "8", "--save-every", "1", "--lr", "1000", "--grad-clip", "0",
                         "--warmup", "0", check=False)
    line = assert_refused(code, err, "loss became NaN at step 4")
    assert "the last good checkpoint (step 3) is kept" in line
    assert not (run / "report.json").exists() and not (run / "model").exists()  # not marked finished
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-3"]
    w = load_file(str(run / "checkpoints" / "step-3" / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in w.values())
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # the same failure before any checkpoint keeps nothing at all
    code, _, err = train(tmp_path / "none", "--steps", "8", "--save-every", "0", "--lr", "1000",
                         "--grad-clip", "0", "--warmup", "0", check=False)
    assert "nothing is kept" in assert_refused(code, err, "loss became NaN at step 4")
    assert not (tmp_path / "none").exists()


def test_failed_write_before_the_first_checkpoint_keeps_nothing(tmp_path, monkeypatch):
    """Disk full while saving the model (safetensors' own error type): one line naming the path; the run
    directory is gone (it was created by this invocation), so running again is not refused."""
    from safetensors import SafetensorError

    import vlpet_fx.export.patched_dir as patched_dir

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(patched_dir, "save_file", full)
    run = tmp_path / "a" / "run"
    code, _, err = train(run, "--steps", "1", check=False)
    assert_refused(code, err, f"cannot write '{run / 'model'}': Error while serializing: I/O error: No space left")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "empty").mkdir()  # an existing empty directory stays, emptied again
    monkeypatch.setattr(patched_dir, "save_file", full)
    code, _, err = train(tmp_path / "empty", "--steps", "1", check=False)
    assert code == 2 and list((tmp_path / "empty").iterdir()) == []


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished, uninterrupted 4-step run with a checkpoint at every step (the last two kept)."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(run, "--steps", "4", "--save-every", "1")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]
    return run


def _copy(base: Path, to: Path, keep: tuple[int, ...] = (3,)) -> Path:
    """The base run as a run killed after the checkpoints ``keep`` (later ones and the end results removed)."""
    shutil.copytree(base, to, symlinks=True)
    for f in ("report.json", "predictions.jsonl", "metrics.csv", "curves.png"):
        (to / f).unlink()
    shutil.rmtree(to / "model")
    for p in (to / "checkpoints").iterdir():
        if int(p.name.split("-")[1]) not in keep:
            shutil.rmtree(p)
    return to


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = (load_file(str(r / "model" / "pet.safetensors")) for r in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


RESUME = ("--steps", "4", "--save-every", "1", "--resume")


def test_resume_falls_back_past_a_damaged_newest_checkpoint(base_run, tmp_path):
    run = _copy(base_run, tmp_path / "run", keep=(3, 4))
    w = run / "checkpoints" / "step-4" / "trainable.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])  # a torn write
    # also: rows of steps after the checkpoint it will resume from, and a half-written last line
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    _, out, _ = train(run, *RESUME)
    assert "step-4" in out and "falling back" in out and "resuming from step 3" in out
    assert "removed the damaged checkpoint step-4" in out
    # bit-identical to the uninterrupted run: resuming from an earlier checkpoint changes nothing
    assert _same_weights(run, base_run)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in map(json.loads, (base_run / "metrics.jsonl")
                                                                .read_text().splitlines())]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # cut back, no duplicates, no damaged line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]


CONTENT_ROWS = ["missing-key", "wrong-shape", "extra-tensor", "non-finite", "state-json", "optimizer-shape",
                "scheduler-key"]


@pytest.mark.parametrize("damage", CONTENT_ROWS)
def test_damaged_checkpoint_content_is_one_line(base_run, tmp_path, damage):
    """Only one checkpoint, damaged inside: one line naming it, and nothing of the run changes."""
    run = _copy(base_run, tmp_path / "run")
    ck = run / "checkpoints" / "step-3"
    w = load_file(str(ck / "trainable.safetensors"))
    name = sorted(w)[0]
    doc = json.loads((ck / "state.json").read_text())
    if damage == "missing-key":
        del w[name]
    elif damage == "wrong-shape":
        w[name] = torch.zeros(3, 5, 7)
    elif damage == "extra-tensor":
        w["visual.extra"] = torch.zeros(2)
    elif damage == "non-finite":
        w[name] = torch.full_like(w[name], float("nan"))
    elif damage == "state-json":
        doc = {"step": 3}
    elif damage == "optimizer-shape":
        st = load_file(str(ck / "state.safetensors"))
        key = next(k for k, v in st.items() if k.startswith("opt.") and v.dim() > 0)
        st[key] = torch.zeros(1, 2, 3)
        save_file(st, str(ck / "state.safetensors"))
    elif damage == "scheduler-key":
        doc["scheduler"]["base_lrs"] = "fast"
    save_file(w, str(ck / "trainable.safetensors"))
    (ck / "state.json").write_text(json.dumps(doc))
    before = snapshot(run)
    code, _, err = train(run, *RESUME, check=False)
    assert_refused(code, err, "no checkpoint of")
    assert "step-3' is damaged or does not fit this run" in err
    assert snapshot(run) == before


def test_resume_removes_partial_checkpoints_and_accepts_a_moved_respelled_path(base_run, tmp_path):
    moved = _copy(base_run, tmp_path / "elsewhere" / "run")
    partial = moved / "checkpoints" / ".step-4.x1y2"
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"\0" * 1000)
    (moved / "checkpoints" / "step-9").mkdir()  # a step directory without its files
    (moved / ".metrics.jsonl.k3j4.tmp").write_text('{"step": 1')  # a killed atomic write
    respelled = "./elsewhere/../elsewhere/./run"
    code, out, err = run_cli("train", *tiny_args(list(RESUME), **{"--out": respelled, **FAST}), cwd=tmp_path)
    assert code == 0, err[-3000:]
    assert "resuming from step 3" in out and "partial checkpoint" in out and "left by an interrupted write" in out
    assert not (moved / ".metrics.jsonl.k3j4.tmp").exists()
    assert sorted(p.name for p in (moved / "checkpoints").iterdir()) == ["step-3", "step-4"]
    assert _same_weights(moved, base_run)


def test_resume_with_nothing_to_resume_says_so_and_starts_at_step_0(tmp_path):
    _, out, _ = train(tmp_path / "new", "--steps", "1", "--resume")
    assert "nothing to resume" in out and "starting from step 0" in out
    assert (tmp_path / "new" / "report.json").is_file()
    # an invocation killed after writing run.json but before its first checkpoint
    run = tmp_path / "killed"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(TrainConfig(out=str(run), **_fast_config()).to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"st')
    _, out, _ = train(run, "--steps", "2", "--resume")
    assert "nothing to resume" in out and "no complete checkpoint" in out
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]


def _fast_config() -> dict:
    return dict(source="digits", tasks=[("vqa", 1.0)], train_per_task=16, eval_per_task=4, batch_size=8,
                eval_every=0, save_every=0, steps=2)


# ------------------------------------------------------------------------------------------- feature cache
def test_damaged_feature_cache_is_recomputed_with_a_warning(tmp_path, capsys):
    import numpy as np

    from vlpet_fx.vl import build_vl
    from vlpet_fx.vl.cache import FeatureCache, FeatureCacheError, image_key

    model = build_vl("t5", "tiny", vocab_size=64)
    ims = [np.full((8, 8), 40 * i, dtype=np.uint8) for i in range(3)]
    ref = FeatureCache(model).features(ims)  # in memory: the reference
    path = FeatureCache(model, tmp_path).path
    FeatureCache(model, tmp_path).features(ims)
    assert path.is_file()
    damages = {
        "garbage": lambda: path.write_bytes(b"garbage"),
        "wrong shape": lambda: save_file({image_key(ims[0]): torch.zeros(2, 2)}, str(path)),
        "non-finite": lambda: save_file({image_key(ims[0]): torch.full(tuple(ref.shape[1:]), float("nan"))},
                                        str(path)),
        "bad key": lambda: save_file({"../../etc": ref[0].contiguous()}, str(path)),
    }
    for what, damage in damages.items():
        damage()
        capsys.readouterr()
        cache = FeatureCache(model, tmp_path)
        err = capsys.readouterr().err
        assert err.startswith(f"warning: feature cache '{path}'") and "computing the features again" in err, what
        assert len(err.strip().splitlines()) == 1
        torch.testing.assert_close(cache.features(ims), ref)
        assert cache.computed == 3, what  # recomputed (and written back whole)
        assert FeatureCache(model, tmp_path).features(ims).shape == ref.shape
    # a cache that cannot be written: one line naming the path
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatureCacheError, match="cannot write the feature cache '.*file/.*features.safetensors'"):
        FeatureCache(model, tmp_path / "file").features(ims)


def test_disk_full_at_a_checkpoint_keeps_the_run_resumable(base_run, tmp_path, monkeypatch):
    """Disk full while a resumed run writes its next checkpoint: one line naming the checkpoint, no partial
    directory left, the earlier checkpoint kept; a later --resume (here without run.json, which is said) finishes
    bit-identically to the uninterrupted run."""
    from safetensors import SafetensorError

    import vlpet_fx.train.state as state

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    run = _copy(base_run, tmp_path / "run")
    monkeypatch.setattr(state, "save_file", full)
    code, _, err = train(run, *RESUME, check=False)
    assert_refused(code, err, f"cannot write '{run / 'checkpoints' / 'step-4'}': ")
    assert "No space left on device" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3"]  # no hidden partial left
    assert not (run / "report.json").exists()
    monkeypatch.undo()
    (run / "run.json").unlink()
    _, out, _ = train(run, *RESUME)
    assert "has no run.json" in out and "resuming from step 3" in out
    assert _same_weights(run, base_run)


def test_cached_features_are_the_eval_mode_features_whatever_the_mode():
    """A frozen image encoder left in training mode (dropout, batch norm) by its caller still caches its
    inference features: the key names the image and the encoder, not the mode. Its mode is restored."""
    import numpy as np
    from torch.nn import functional as F

    from vlpet_fx.vl import build_vl
    from vlpet_fx.vl.cache import FeatureCache

    model = build_vl("t5", "tiny", vocab_size=64)
    first = next(m for m in model.visual.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(lambda m, a, out: F.dropout(out, 0.5, training=m.training))
    ims = [np.full((8, 8), 40 * i, dtype=np.uint8) for i in range(3)]
    model.visual.eval()
    ref = FeatureCache(model).features(ims)
    model.visual.train()
    got = FeatureCache(model).features(ims)
    assert torch.equal(got, ref) and model.visual.training
