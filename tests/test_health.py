"""The encoder-collapse check (vlpet_fx.train.health) against a pairwise loop, and its place in a run's report."""

from __future__ import annotations

import json
import math

import torch

from vlpet_fx.train import TrainConfig, train
from vlpet_fx.train.health import COLLAPSED, position_cosine
from vlpet_fx.train.report import read_report


class _Encoder(torch.nn.Module):
    """A stand-in with VLModel.encode's contract: given hidden states and mask back."""

    def __init__(self, hidden, mask):
        super().__init__()
        self.hidden, self.mask = hidden, mask

    def encode(self, **_):
        return self.hidden, self.mask


def _pairwise(hidden, mask) -> float:
    per = []
    for h, m in zip(hidden, mask):
        rows = [h[i] for i in range(len(m)) if m[i]]
        if len(rows) < 2:
            continue
        cs = [float(torch.nn.functional.cosine_similarity(a, b, dim=0))
              for i, a in enumerate(rows) for j, b in enumerate(rows) if i != j]
        per.append(sum(cs) / len(cs))
    return sum(per) / len(per) if per else float("nan")


def test_position_cosine_is_the_mean_pairwise_cosine_over_unmasked_positions():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0]])
    got = position_cosine(_Encoder(hidden, mask), {})
    assert math.isclose(got, _pairwise(hidden, mask), abs_tol=1e-5)
    same = torch.randn(16, generator=g).expand(2, 5, 16) * torch.rand(2, 5, 1, generator=g)  # one direction
    assert position_cosine(_Encoder(same, torch.ones(2, 5)), {}) > 0.9999
    assert math.isnan(position_cosine(_Encoder(hidden[:1, :1], torch.ones(1, 1)), {}))


def _cfg(out, **kw):
    return TrainConfig(**{**dict(steps=2, train_per_task=8, eval_per_task=4, batch_size=4, eval_every=0,
                                 save_every=0, tasks=[("vqa", 1.0), ("nlvr", 1.0)], source="digits",
                                 out=str(out)), **kw})


def test_a_run_reports_its_encoders_position_cosine(tmp_path):
    report = train(_cfg(tmp_path / "run"))
    cos = report["encoder_position_cos"]
    assert isinstance(cos, float) and -1.0 <= cos < COLLAPSED
    assert read_report(tmp_path / "run").encoder_position_cos == cos
    assert json.loads((tmp_path / "run" / "report.json").read_text())["encoder_position_cos"] == cos


def test_a_collapsed_encoder_is_reported_with_a_warning(tmp_path, monkeypatch):
    import vlpet_fx.train.loop as loop

    said = []
    monkeypatch.setattr(loop, "position_cosine", lambda model, inputs: 0.995)
    monkeypatch.setattr(loop.Trainer, "say", lambda self, message: said.append(message))
    report = train(_cfg(tmp_path / "run"))
    assert report["encoder_position_cos"] == 0.995
    warnings = [m for m in said if "every position" in m]
    assert len(warnings) == 1 and "0.995" in warnings[0] and "--lr" in warnings[0]
