"""docs/GUIDE.md, walked through as written: its stand-in Python block, then every `vlpet-fx` command of its sh
block, then its Python loading block, in one working directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "GUIDE.md"
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), flags=re.S)


def _python(code: str, cwd: Path) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=900, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_the_guide_runs_as_written(tmp_path):
    stand_ins, load = next(b for b in _blocks("python") if "save_pretrained" in b), next(
        b for b in _blocks("python") if "Predictor.from_dir" in b)
    (tmp_path / "images").mkdir()
    _python(stand_ins, tmp_path)
    (commands,) = _blocks("sh")
    outputs = {}
    for line in commands.strip().splitlines():
        args = shlex.split(line)
        assert args[0] == "vlpet-fx", line
        res = subprocess.run([sys.executable, "-m", "vlpet_fx.cli.main", *args[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=1200, env=ENV)
        assert res.returncode == 0, (line, res.stderr[-3000:])
        outputs[args[1]] = res.stdout
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["visual_size"] == "RN50@rn50.safetensors"
    scores = json.loads(outputs["evaluate"])
    assert scores["examples"] == 8 and set(scores["scores"]) == {"digit"}
    assert scores == json.loads((tmp_path / "eval" / "scores.json").read_text())
    answer = json.loads(outputs["predict"])
    assert answer["prompt"] == "digit: what digit is this?" and answer["tokens"] >= 1
    assert (tmp_path / "adapters" / "vlpet.json").is_file() and (tmp_path / "adapters" / "tokenizer").is_dir()
    text, _, logprob = _python(load, tmp_path).rstrip("\n").rpartition(" ")  # print(answer, logprob)
    # the adapters directory answers exactly as the run did
    assert text == answer["answer"]
    assert float(logprob) == pytest.approx(answer["logprob"], abs=1e-4)
