"""Training under FSDP through Accelerate (issue 13 point 7): the wrapping policy, the refusals, checkpoints gathered
from shards and loaded back into shards, and a 2-process CPU run (tests/fsdp_cpu.py: Accelerate's FSDP2 on gloo)
that follows one process's trajectory, checkpoints and resumes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vlpet_fx.train.sharded import ShardingError, check_distributed, gather_state, place, shard_optimizer_state, \
    unsharded, wrap_classes
from vlpet_fx.train.state import load_checkpoint, save_checkpoint

from trajectory import assert_same_trajectory, losses, same_length_data

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")


def _acc(kind: str, version: int = 2):
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind),
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))


def test_which_distributed_set_ups_the_loop_runs(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert check_distributed(_acc("NO")) is False and check_distributed(_acc("MULTI_CPU")) is False
    assert check_distributed(_acc("FSDP")) is True
    with pytest.raises(ShardingError, match="not version 1: set fsdp_version: 2"):
        check_distributed(_acc("FSDP", 1))
    with pytest.raises(ShardingError, match="not DeepSpeed"):
        check_distributed(_acc("DEEPSPEED"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ShardingError, match="Accelerate set up MULTI_CPU: it runs FSDP on GPUs"):
        check_distributed(_acc("MULTI_CPU"))


def test_fsdp_asked_for_on_cpu_is_refused_not_run_as_ddp(tmp_path):
    """`accelerate launch --use_fsdp` on a CPU-only machine: Accelerate gives DDP; train says so in one line."""
    res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "train", "--out", str(tmp_path / "r"),
                          "--steps", "1", "--source", "digits", "--task", "vqa", "--train-per-task", "4",
                          "--eval-per-task", "2", "--batch-size", "2"], capture_output=True, text=True,
                         env=dict(ENV, ACCELERATE_USE_FSDP="true"), timeout=300)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
    assert "FSDP was asked for" in lines[0] and "on a CPU-only machine train with DDP" in lines[0]
    assert not (tmp_path / "r").exists()


def test_wrapping_policy_is_the_text_models_declared_layers():
    from vlpet_fx.vl import build_vl

    t5 = build_vl("t5", "tiny", vocab_size=32)
    assert wrap_classes(t5) == ["T5Block"]
    bart = build_vl("bart", "tiny", vocab_size=32)
    names = wrap_classes(bart)
    assert set(names) >= {"BartEncoderLayer", "BartDecoderLayer"}
    present = {type(m).__name__ for m in bart.modules()}
    assert set(names) <= present  # only classes the model has (declared but absent ones are dropped)


# ---------------------------------------------------------------------- shards in one process (gloo, world 1)
@pytest.fixture
def group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 10), nn.Sequential(nn.Linear(10, 10), nn.ReLU()), nn.Linear(10, 3))
    net[0].weight.requires_grad_(False)  # frozen and trainable in one unit
    return net


def _step(net, opt):
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    net(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_checkpoint_of_a_sharded_model_round_trips(group, tmp_path):
    """gather_state gives the whole tensors (equal to an unsharded twin's after the same step); loading writes
    them back into the shards and the optimizer moments become DTensors like their parameters."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    plain, sharded = _net(), _net()
    fully_shard(sharded[1])
    fully_shard(sharded)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, sharded)]
    for m, o in zip((plain, sharded), opts):
        _step(m, o)
    assert isinstance(sharded[2].weight, DTensor)
    sched = torch.optim.lr_scheduler.LambdaLR(opts[1], lambda s: 1.0)
    weights, opt_state = gather_state(sharded, opts[1])
    ref = {n: p.detach() for n, p in plain.named_parameters() if p.requires_grad}
    assert weights.keys() == ref.keys()
    for n in ref:
        assert not isinstance(weights[n], DTensor)
        torch.testing.assert_close(weights[n], ref[n])
    save_checkpoint(tmp_path / "run", 1, sharded, opts[1], sched, weights=weights, optimizer_state=opt_state)
    # into a fresh sharded model and optimizer
    fresh = _net(seed=5)
    fully_shard(fresh[1])
    fully_shard(fresh)
    opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    _step(fresh, opt)  # some state to be replaced
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step-1", fresh, opt, sched2) == 1
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert isinstance(p, DTensor)
            torch.testing.assert_close(p.full_tensor(), ref[n])
    for p in (q for g in opt.param_groups for q in g["params"]):
        assert isinstance(opt.state[p]["exp_avg"], DTensor) and opt.state[p]["exp_avg"].placements == p.placements
    # the next steps of the loaded model equal those of the unsharded twin (the frozen weight is the run's base:
    # checkpoints do not hold it)
    fresh[0].weight.data.copy_(place(fresh[0].weight, plain[0].weight.detach()))  # frozen: not in checkpoints
    _step(plain, opts[0])
    _step(fresh, opt)
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p.full_tensor(), dict(plain.named_parameters())[n].detach())


def test_unsharded_gives_whole_parameters_and_shards_again(group):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    net = _net()
    fully_shard(net[1])
    fully_shard(net)
    net(torch.randn(2, 6))  # FSDP's lazy set-up
    with unsharded(net):
        assert not any(isinstance(p, DTensor) for p in net.parameters())
        whole = {n: p.detach().clone() for n, p in net.named_parameters()}
    assert all(isinstance(p, DTensor) for p in net.parameters())
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.full_tensor(), whole[n])
    with unsharded(net, enabled=False):
        assert all(isinstance(p, DTensor) for p in net.parameters())


def test_place_and_shard_optimizer_state_leave_plain_tensors_alone():
    p = torch.zeros(3)
    assert place(p, torch.ones(3)) is not p and torch.equal(place(p, torch.ones(3)), torch.ones(3))
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(3))])
    opt.state[opt.param_groups[0]["params"][0]]["exp_avg"] = torch.ones(3)
    shard_optimizer_state(opt)
    assert type(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]) is torch.Tensor


# ---------------------------------------------------------------------------------- two processes on CPU
def _weights(run: Path) -> dict:
    return load_file(str(run / "model" / "pet.safetensors"))


@pytest.mark.slow
def test_fsdp_two_processes_train_checkpoint_and_resume(tmp_path):
    args = ["--steps", "4", "--save-every", "2", "--eval-every", "2", "--data", str(same_length_data(tmp_path / "d")),
            "--batch-size", "8", "--dropout", "0", "--feature-cache", str(tmp_path / "c")]

    def fsdp(out: Path, *extra: str):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                              "29541", str(HERE / "fsdp_cpu.py"), "train", "--out", str(out), *args, *extra],
                             capture_output=True, text=True, env=ENV, timeout=900)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", "train", "--out", str(one), *args], check=True,
                   capture_output=True, env=ENV, timeout=900)
    two = tmp_path / "two"
    res = fsdp(two)
    assert "FSDP: 5 shard units over 2 processes (the model, T5Block)" in res.stdout
    assert_same_trajectory(one, two)  # sharded training follows one process's trajectory
    b = _weights(two)
    # checkpoints of whole tensors, as one process writes them
    ckpt, ref = (load_file(str(r / "checkpoints" / "step-4" / "trainable.safetensors")) for r in (two, one))
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in ref.items()}
    # killed after step 2: resumed into the shards, it ends where the uninterrupted run ended
    killed = tmp_path / "killed"
    shutil.copytree(two, killed)
    for f in ("report.json", "predictions.jsonl", "metrics.csv", "curves.png"):
        (killed / f).unlink()
    shutil.rmtree(killed / "model")
    shutil.rmtree(killed / "checkpoints" / "step-4")
    res = fsdp(killed, "--resume")
    assert "resuming from step 2" in res.stdout
    c = _weights(killed)
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-5, atol=1e-7)
    assert losses(killed) == pytest.approx(losses(two), rel=1e-5)
