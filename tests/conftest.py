import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))  # tests/toy.py importable as `toy`

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def vl_run(tmp_path_factory):
    """A tiny finished `train` run (vqa + nlvr on digits, VL-PET-large): model/, tokenizer/, report.json."""
    from vlpet_fx.train import TrainConfig, train

    out = tmp_path_factory.mktemp("vl_run") / "run"
    train(TrainConfig(out=str(out), steps=6, train_per_task=16, eval_per_task=4, batch_size=8, eval_every=0,
                      save_every=0, tasks=[("vqa", 1.0), ("nlvr", 1.0)], source="digits", lr=3e-3))
    return out
