"""VL assembly, feature cache, training runs: outputs, resume after SIGKILL, two processes, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlpet_fx
from vlpet_fx.vl import build_vl

from trajectory import assert_same_trajectory, same_length_data

FAST = ["--batch-size", "8", "--eval-every", "0"]  # both modes
BUILTIN = ["--train-per-task", "16", "--eval-per-task", "4"]  # built-in tasks only (refused with --data)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def cli(*args, check=True, **kw):
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args], capture_output=True, text=True,
                         env=ENV, **kw)
    if check:
        assert res.returncode == 0, res.stderr[-2000:]
    return res


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "pet.safetensors"))


def test_vl_model_has_three_stacks_and_rules_train_projector_only():
    m = build_vl("t5", "tiny", vocab_size=64)
    table = vlpet_fx.discover(m)
    assert table.num_layers() == {"visual": 2, "encoder": 2, "decoder": 2}
    vlpet_fx.patch(m, "vlpet_large")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {"visual_projection.feat_embedding.0.weight", "visual_projection.feat_embedding.1.weight",
            "visual_projection.absolute_vis_pos_embedding.0.weight", "visual_projection.img_order_embedding.weight"} <= trainable
    assert not any(n.startswith("visual.") for n in trainable)


def test_feature_cache_equals_on_the_fly(tmp_path):
    from vlpet_fx.train import TrainConfig, train

    common = dict(steps=3, train_per_task=8, eval_per_task=2, batch_size=4, eval_every=0, save_every=0,
                  tasks=[("vqa", 1.0), ("nlvr", 1.0)], source="digits")
    train(TrainConfig(out=str(tmp_path / "a"), feature_cache=str(tmp_path / "cache"), **common))
    train(TrainConfig(out=str(tmp_path / "b"), on_the_fly=True, **common))
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert list((tmp_path / "cache").rglob("features.safetensors"))


def test_run_writes_metrics_plot_report_and_model(tmp_path):
    run = tmp_path / "run"
    res = cli("train", "--out", str(run), "--steps", "4", "--save-every", "2", "--source", "digits", *BUILTIN, *FAST)
    assert "average" in res.stdout
    for f in ["metrics.jsonl", "metrics.csv", "curves.png", "report.json", "run.json", "model/vlpet.json",
              "tokenizer/tokenizer.json"]:
        assert (run / f).exists(), f
    report = json.loads((run / "report.json").read_text())
    assert set(report["scores"]) == {"vqa", "gqa", "nlvr", "caption"}
    assert report["trainable_params"] > 0
    # the run's model directory is an export source
    again = vlpet_fx.load(run / "model")
    assert vlpet_fx.summary(again).trainable == report["trainable_params"]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    args = ["--steps", "10", "--save-every", "2", "--source", "digits", "--feature-cache", str(tmp_path / "c"), *BUILTIN,
            *FAST]
    cli("train", "--out", str(tmp_path / "full"), *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlpet_fx.cli.main", "train", "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 240
    while time.time() < deadline and not (killed / "checkpoints" / "step-4" / "state.json").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists(), "the run finished before it could be killed"
    cli("train", "--out", str(killed), *args, "--resume")
    a, b = weights(tmp_path / "full"), weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one(tmp_path):
    args = ["--steps", "3", "--save-every", "0", "--data", str(same_length_data(tmp_path / "d")), *FAST,
            "--dropout", "0"]
    cli("train", "--out", str(tmp_path / "one"), *args)
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "vlpet_fx.cli.main", "train", "--out", str(tmp_path / "two"), *args],
                         capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    # really two processes (on a CPU-only machine Accelerate needs cpu=True for that): one writer, and the
    # process group's sums in the loss
    assert res.stdout.count("trainable") == 1, res.stdout
    assert_same_trajectory(tmp_path / "one", tmp_path / "two")


def test_user_jsonl_data(tmp_path):
    from PIL import Image
    import numpy as np

    rows = []
    for i in range(6):
        Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8) * (i + 1)) % 255).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"images": [f"{i}.png"], "input": f"what is image {i}?", "target": f"number {i}",
                                "task": "mine"}))
    rows.insert(2, json.dumps({"images": ["missing.png"], "input": "x", "target": "y", "task": "mine"}))
    (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
    res = cli("train", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "d.jsonl"), "--steps", "2",
              *FAST, check=False)
    assert res.returncode == 2 and "d.jsonl:3:" in res.stderr
    res = cli("train", "--out", str(tmp_path / "r2"), "--data", str(tmp_path / "d.jsonl"), "--steps", "2",
              "--on-bad-rows", "skip", *FAST)
    report = json.loads((tmp_path / "r2" / "report.json").read_text())
    assert len(report["bad_rows"]) == 1 and "d.jsonl:3:" in report["bad_rows"][0]


@pytest.mark.parametrize("args, needle", [
    (["--task", "vqa", "--task", "poetry"], "unknown task 'poetry'"),
    (["--data", "{tmp}/empty.jsonl"], "no usable rows"),
    (["--rules", "{tmp}/nothing.yaml"], "trains nothing"),
    (["--out", "{tmp}/taken"], "holds another run"),
])
def test_train_bad_input(tmp_path, args, needle):
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "nothing.yaml").write_text("name: nothing\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run.json").write_text("{}")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    builtin = [] if "--data" in args else ["--source", "digits", *BUILTIN]
    res = cli("train", *args, "--steps", "1", *builtin, *FAST, check=False)
    assert res.returncode == 2, res.stdout[-1000:] + res.stderr[-1000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert needle in lines[0]


def test_tokens_per_image_concatenates_encoder_tokens():
    m = build_vl("t5", "tiny", vocab_size=64, tokens_per_image=2)  # tiny ViT: 16 patch tokens of width 64
    assert m.group == 8 and m.visual_projection.feat_embedding[0].in_features == 8 * 64
    ids = torch.ones(2, 5, dtype=torch.long)
    embeds, mask = m.embed(ids, torch.ones_like(ids), pixel_values=torch.randn(2, 3, 3, 32, 32),
                           visual_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert embeds.shape[1] == 5 + 3 * 2 and mask[0].tolist() == [1] * 5 + [1, 1, 1, 1, 0, 0]
    with pytest.raises(vlpet_fx.ModelSpecError, match="does not divide"):
        build_vl("t5", "tiny", tokens_per_image=3)


def test_gradient_accumulation_matches_one_batch(tmp_path):
    from vlpet_fx.train import TrainConfig, train

    common = dict(steps=3, train_per_task=8, eval_per_task=2, batch_size=8, eval_every=0, save_every=0,
                  tasks=[("vqa", 1.0), ("caption", 1.0)], source="digits", feature_cache=str(tmp_path / "c"),
                  dropout=0.0)  # dropout masks depend on how the batch is split
    train(TrainConfig(out=str(tmp_path / "a"), **common))
    train(TrainConfig(out=str(tmp_path / "b"), grad_accum=4, **common))

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return torch.tensor([r["loss"] for r in rows if "loss" in r])

    torch.testing.assert_close(losses(tmp_path / "a"), losses(tmp_path / "b"), rtol=1e-4, atol=1e-6)
    # Adam turns rounding-level gradient differences of parameters whose gradient is ~0 into lr-sized steps:
    # the typical weight agrees far below one step's size (lr = 1e-3), a few by up to a few lr
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.median() < 1e-5
    assert diff.max() < 3 * 3e-3 * 1.01


def test_vl_builtins_inspect_shows_visual_stack():
    res = cli("inspect", "vl-t5", "--format", "json")
    stacks = {s["stack"] for s in json.loads(res.stdout)["sites"]}
    assert stacks == {"visual", "encoder", "decoder"}


def test_any_open_clip_architecture_and_clear_errors(tmp_path):
    m = build_vl("bart", "tiny", visual="open_clip", visual_size="RN50", vocab_size=64)
    assert m.feature_dim == 1024 and vlpet_fx.discover(m).num_layers()["visual"] == 1
    with pytest.raises(vlpet_fx.ModelSpecError, match="no architecture 'ViT-Nope'"):
        build_vl("t5", "tiny", visual="open_clip", visual_size="ViT-Nope")
    with pytest.raises(vlpet_fx.ModelSpecError, match="does not exist"):
        build_vl("t5", "tiny", visual="open_clip", visual_size=f"RN50@{tmp_path}/missing.bin")


def test_adapted_run_names_its_backbone_and_resume_refuses_a_retrained_one(tmp_path, vl_run):
    """report.json and run.json name an --init-from backbone by the sha256 of its weights file (computed here with
    hashlib); resuming on the same backbone goes on, on a backbone trained again at the same path it is refused."""
    import hashlib
    import shutil

    from vlpet_fx.train import TrainConfig, TrainError, train

    def cfg(out, **kw):
        return TrainConfig(out=str(out), train_per_task=16, eval_per_task=4, batch_size=8, eval_every=0,
                           tasks=[("vqa", 1.0)], source="digits", **kw)

    bb, run = tmp_path / "bb", tmp_path / "run"
    train(cfg(bb, rules="full_finetune", steps=2, save_every=0))
    digest = hashlib.sha256((bb / "model" / "pet.safetensors").read_bytes()).hexdigest()
    rep = train(cfg(run, init_from=str(bb), steps=2, save_every=1))
    assert rep["backbone_sha256"] == digest
    assert json.loads((run / "report.json").read_text())["backbone_sha256"] == digest
    assert json.loads((run / "run.json").read_text())["backbone_sha256"] == digest
    assert json.loads((vl_run / "report.json").read_text())["backbone_sha256"] is None  # no --init-from
    assert train(cfg(run, init_from=str(bb), steps=3, save_every=1, resume=True))["steps"] == 3
    shutil.rmtree(bb)  # the backbone trained again at the same path, with another seed: other weights
    train(cfg(bb, rules="full_finetune", steps=2, save_every=0, seed=1))
    assert hashlib.sha256((bb / "model" / "pet.safetensors").read_bytes()).hexdigest() != digest
    with pytest.raises(TrainError, match="not the one this run started from"):
        train(cfg(run, init_from=str(bb), steps=4, save_every=1, resume=True))
