"""Causal LMs and VLMs: stacks from the causal mask, norms by computation, capture inputs and failure messages,
and the CLI end to end on a tiny LLaVA directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import vlpet_fx
from vlpet_fx.capture.inputs import build_example_inputs
from vlpet_fx.cli.main import app
from vlpet_fx.zoo.tiny import tiny_config

transformers = pytest.importorskip("transformers")
runner = CliRunner()


# -- stacks from the dataflow: a hand-written decoder-only model with no HF names ---------------------------
class ScaledNorm(nn.Module):
    """RMS normalisation written out (the class name says nothing about it)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


class Standardise(nn.Module):
    """(x - mean) / sqrt(var + eps) * g + b, written out."""

    def __init__(self, d):
        super().__init__()
        self.g, self.b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.g + self.b


class NotANorm(nn.Module):
    """rsqrt of a mean over the *batch* axis: a statistic, but not a per-token normalisation."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6) * self.w


class Cell(nn.Module):
    def __init__(self, d, mask):
        super().__init__()
        self.mask = mask
        self.a, self.f = ScaledNorm(d), Standardise(d)
        self.p, self.r, self.s, self.t = (nn.Linear(d, d) for _ in range(4))
        self.u, self.w = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.odd = NotANorm(d)

    def forward(self, x):
        b, n, d = x.shape
        h = self.a(x)
        q, k, v = (m(h).view(b, n, 2, d // 2).transpose(1, 2) for m in (self.p, self.r, self.s))
        if self.mask == "is_causal":
            y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(d // 2)
            if self.mask == "positions":
                pos = torch.arange(n)
                scores = scores.masked_fill(~(pos[None, :] <= pos[:, None]), float("-inf"))
            y = scores.softmax(-1) @ v
        x = x + self.t(y.transpose(1, 2).reshape(b, n, d))
        return x + self.w(torch.relu(self.u(self.odd(self.f(x)))))


class TinyLM(nn.Module):
    def __init__(self, mask, d=16, vocab=32, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.cells = nn.ModuleList(Cell(d, mask) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for c in self.cells:
            x = c(x)
        return x


@pytest.mark.parametrize("mask, stack", [("is_causal", "decoder"), ("positions", "decoder"), ("none", "encoder")])
def test_causal_self_attention_makes_a_decoder(mask, stack):
    table = vlpet_fx.discover(TinyLM(mask), (torch.arange(10).view(2, 5),), fast=False)
    assert table.num_layers() == {stack: 2}
    assert {s.block for s in table} == {"self_attn", "ffn"}


def test_norms_are_found_by_what_they_compute():
    model = TinyLM("is_causal")
    table = vlpet_fx.discover(model, (torch.arange(10).view(2, 5),), fast=False)
    want = {f"cells.{i}.{n}" for i in range(2) for n in ("a", "f")}
    assert set(table.meta["norms"]) == want  # NotANorm (mean over the batch axis) is not among them
    rs = vlpet_fx.rules.loader.parse_rules(
        "name: n\nrules: []\ntrainable:\n  - select: {stack: decoder, norms: true}\n", "n.yaml")
    plan = vlpet_fx.plan(model, rs, table=table)
    assert plan.trainable_params == 2 * (16 + 2 * 16)  # per layer: w of ScaledNorm, g and b of Standardise


def test_norms_selector_equals_the_layernorm_regex_it_replaces():
    from vlpet_fx.zoo import build_model

    model = build_model("t5", "tiny")
    table = vlpet_fx.discover(model)
    base = "name: n\nrules: []\ntrainable:\n  - select: {stack: encoder, %s}\n"
    by_regex = vlpet_fx.plan(model, vlpet_fx.rules.loader.parse_rules(base % 'module_type: ".*LayerNorm.*"', "a"),
                             table=table)
    by_norms = vlpet_fx.plan(model, vlpet_fx.rules.loader.parse_rules(base % "norms: true", "b"), table=table)
    assert by_norms.trainable == by_regex.trainable
    assert by_norms.trainable_params == 64 * (2 * 2 + 1)  # T5 encoder: 2 norms per layer + the final one


# -- capture inputs and failure messages ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()


def test_causal_lm_inputs_come_from_the_signature(llama):
    name, args, kwargs = build_example_inputs(llama)
    assert name == "hf-auto" and args == ()
    assert set(kwargs) == {"input_ids", "attention_mask", "use_cache"} and kwargs["use_cache"] is False
    assert int(kwargs["input_ids"].max()) < llama.config.vocab_size


def test_a_cache_in_the_output_gets_the_cache_fix(llama):
    ids = torch.arange(4, 12).view(1, 8)
    with pytest.raises(vlpet_fx.CaptureError) as info:
        vlpet_fx.capture(llama, dict(input_ids=ids, use_cache=True))
    msg = str(info.value)
    assert "use_cache=False" in msg and "data-dependent" not in msg and "\n" not in msg


def test_inputs_the_model_rejects_are_reported_as_such():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            if x.shape[-1] != 4:
                raise ValueError("expected 4 features")
            return self.lin(x)

    with pytest.raises(vlpet_fx.CaptureError) as info:
        vlpet_fx.capture(Picky(), (torch.randn(2, 3),))
    msg = str(info.value)
    assert "even without torch.export: ValueError: expected 4 features" in msg and "\n" not in msg


def test_vlm_inputs_have_one_image_token_per_image_feature():
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(tiny_config("llava")).eval()
    _, _, kwargs = build_example_inputs(model)
    vc = model.config.vision_config
    per_image = (vc.image_size // vc.patch_size) ** 2  # patches; "default" strategy drops the CLS token
    assert kwargs["pixel_values"].shape[1:] == (vc.num_channels, vc.image_size, vc.image_size)
    assert (kwargs["input_ids"] == model.config.image_token_index).sum(1).tolist() == [per_image] * 2
    model(**kwargs)  # runs


def test_speech_inputs_follow_the_config():
    torch.manual_seed(0)
    model = transformers.AutoModelForSpeechSeq2Seq.from_config(tiny_config("whisper")).eval()
    _, _, kwargs = build_example_inputs(model)
    cfg = model.config
    assert kwargs["input_features"].shape[1:] == (cfg.num_mel_bins, 2 * cfg.max_source_positions)  # conv2 stride 2
    table = vlpet_fx.discover(model)
    assert table.num_layers() == {"encoder": cfg.encoder_layers, "decoder": cfg.decoder_layers}


# -- the CLI on saved directories --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("llava")
    transformers.AutoModelForImageTextToText.from_config(tiny_config("llava")).save_pretrained(d)
    return d


def test_inspect_llava_dir_with_causal_lm_rules(llava_dir):
    res = runner.invoke(app, ["inspect", str(llava_dir), "--rules", "vlpet_causal_lm", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    cfg = transformers.AutoConfig.from_pretrained(llava_dir)
    stacks = {}
    for s in doc["sites"]:
        stacks.setdefault(s["stack"], set()).add(s["layer"])
    assert {k: len(v) for k, v in stacks.items()} == {"visual": cfg.vision_config.num_hidden_layers,
                                                       "decoder": cfg.text_config.num_hidden_layers}
    res = runner.invoke(app, ["inspect", str(llava_dir), "--rules", "vlpet_causal_lm"])
    assert res.exit_code == 0 and "●" in res.output  # the sites the rules hit are marked


def test_patch_dry_run_budget_on_llava_dir(llava_dir):
    res = runner.invoke(app, ["patch", str(llava_dir), "--rules", "vlpet_causal_lm", "--dry-run", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    layers = transformers.AutoConfig.from_pretrained(llava_dir).text_config.num_hidden_layers
    assert len(doc["placements"]) == 3 * layers  # after self-attn, after FFN, parallel to v
    assert {(p["stack"], p["block"], p["role"]) for p in doc["placements"]} == {
        ("decoder", "self_attn", "output"), ("decoder", "ffn", "output"), ("decoder", "self_attn", "v")}
    # existing trainable parameters: the language model's RMSNorm weights (class names as the reference)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.from_pretrained(llava_dir))
    norms = sum(p.numel() for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")
                and "language_model" in n for p in m.parameters())
    plan = vlpet_fx.plan(model, "vlpet_causal_lm")
    assert sum(plan.trainable.values()) == norms
    assert doc["trainable_params"] == plan.trainable_params


def test_train_refuses_a_causal_lm_in_one_line(tmp_path, llama):
    llama.save_pretrained(tmp_path / "lm")
    res = runner.invoke(app, ["train", "--text", str(tmp_path / "lm"), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if "error:" in line]  # (a weight-loading bar may precede it)
    assert len(errors) == 1 and "not train those yet" in errors[0] and "Traceback" not in res.output


def test_a_failing_input_builder_is_one_line():
    from vlpet_fx.capture import inputs

    class Odd(nn.Module):
        def forward(self, x):
            return x

    def broken(model):
        if isinstance(model, Odd):
            raise KeyError("no such setting")
        return None

    inputs.register_example_inputs("broken-test-builder")(broken)
    try:
        with pytest.raises(vlpet_fx.CaptureError) as info:
            vlpet_fx.capture(Odd())
    finally:
        inputs._BUILDERS[:] = [b for b in inputs._BUILDERS if b[0] != "broken-test-builder"]
    msg = str(info.value)
    assert "broken-test-builder" in msg and "KeyError" in msg and "\n" not in msg
