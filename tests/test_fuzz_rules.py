"""Property-based fuzz of the rules loader and the planner (Hypothesis, deterministic).

Over 2,000 generated documents: structured rule sets built from the schema's keys with hostile values
(wrong types, NaN/inf, huge and negative numbers, bad ranges and patterns, control characters), raw
YAML-ish text made of YAML's own tokens (anchors, aliases, tags, flow and block syntax), structured documents
with such tokens spliced in, and alias bombs. Each one must either load (and then plan on a tiny T5, or be
refused by the planner) or be refused with a one-line ``VlpetError``; any other exception fails. Each example
is bounded in time (Hypothesis ``deadline``) and in memory (``tracemalloc`` peak).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import threading
import tracemalloc

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlpet_fx
from vlpet_fx.errors import VlpetError
from vlpet_fx.modules.base import get_method, list_methods
from vlpet_fx.rules import parse_rules
from vlpet_fx.zoo import build_model

PEAK_BYTES = 64 << 20  # traced Python memory one example may use
DEADLINE_MS = 3000  # wall time one example may take (the machine may be shared)
SETTINGS = dict(derandomize=True, database=None, deadline=DEADLINE_MS, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])

PARAM_KEYS = sorted({f.name for m in list_methods() for f in dataclasses.fields(get_method(m).config)})

hostile = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(),
        st.sampled_from([0, -1, 1, 2, 3, 4, 7, 8, 16, 64, 257, 10**9, 2**31, 2**31 + 1, 4 * 10**9, 10**30, -10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["all", "0:6", "-2:", "1..3", "..", ":", "0..", "a:b", "", "9" * 40, "(a+)+$",
                         r"^(\w+\.?)*!$", r"(a)\1", "(?=a)", ".*", "[", "\x00", "\n", "[/]", "encoder", "decoder",
                         "visual", "ffn", "self_attn", "q", "output", "after", "parallel", "large", "none", "gelu"]),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def _maybe(plausible) -> st.SearchStrategy:
    return st.one_of(plausible, plausible, hostile)


selector = st.fixed_dictionaries({}, optional={
    "stack": _maybe(st.sampled_from(["encoder", "decoder", ["encoder", "decoder"], "visual"])),
    "layers": _maybe(st.one_of(st.lists(st.integers(-4, 4), min_size=1, max_size=3),
                               st.sampled_from(["all", "0:2", "-1:", "0..1", "1:9"]),
                               st.fixed_dictionaries({"encoder": st.lists(st.integers(-3, 3), min_size=1, max_size=2)}))),
    "block": _maybe(st.sampled_from(["self_attn", "cross_attn", "ffn", ["self_attn", "ffn"]])),
    "role": _maybe(st.sampled_from(["q", "k", "v", "o", "in", "out", "output", ["q", "v"]])),
    "path_regex": _maybe(st.sampled_from([".", "encoder", r"^(\w+\.?)*!$", "(a|aa)+b", "SelfAttention\\.q$"])),
    "module_type": _maybe(st.sampled_from(["Linear", ".*LayerNorm.*", "T5.*", "(x+x+)+y"])),
})

params = st.dictionaries(st.one_of(st.sampled_from(PARAM_KEYS), st.text(max_size=6)),
                         _maybe(st.sampled_from([1, 2, 4, 8, 16, 0.3, 4.0, True, False, "gelu", "large", "middleY",
                                                 "small", "none", "down-up-pair", "normal", "add"])), max_size=5)

method = st.builds(lambda t, p: {"type": t, **p}, _maybe(st.sampled_from(list_methods())), params)

rule = st.fixed_dictionaries({"select": _maybe(selector)}, optional={
    "name": _maybe(st.text(min_size=1, max_size=10)),
    "insert": _maybe(st.sampled_from(["m0", "m1", "adapter", "lora", "vlpet", "none", "nope"])),
    "with": _maybe(params),
    "placement": _maybe(st.sampled_from(["after", "parallel"])),
    "optional": _maybe(st.booleans()),
    "skip": _maybe(st.booleans()),
})

trainable = st.fixed_dictionaries({}, optional={
    "name": _maybe(st.text(min_size=1, max_size=10)), "select": _maybe(selector),
    "params": _maybe(st.sampled_from(["all", "weight", "bias"])), "optional": _maybe(st.booleans()),
})

documents = st.fixed_dictionaries({"name": _maybe(st.text(min_size=1, max_size=10))}, optional={
    "description": _maybe(st.text(max_size=20)),
    "methods": _maybe(st.dictionaries(st.sampled_from(["m0", "m1", "m2"]), method, max_size=3)),
    "rules": _maybe(st.lists(rule, max_size=4)),
    "trainable": _maybe(st.lists(trainable, max_size=2)),
    "train_all": _maybe(st.booleans()),
    "extra": hostile,
})

# documents close to a valid rule set (real selectors, the shipped methods at small widths, one part drawn from
# the hostile values above): they reach the planner, where widths, placements and matches are checked
near_selector = st.fixed_dictionaries({
    "stack": st.sampled_from(["encoder", "decoder"]),
    "role": st.sampled_from(["q", "v", "output", "in", "out"])}, optional={
    "block": st.sampled_from(["self_attn", "cross_attn", "ffn"]),
    "layers": st.sampled_from([[0], [-1], "all", "0:2", [7]])})
near_method = st.one_of(
    st.fixed_dictionaries({"type": st.just("adapter")}, optional={"reduction": st.sampled_from([1, 2, 4, 8, 0, 1000])}),
    st.fixed_dictionaries({"type": st.just("lora")}, optional={"rank": st.sampled_from([1, 4, 8, 0, 4096])}),
    st.fixed_dictionaries({"type": st.just("vlpet")}, optional={
        "heads": st.sampled_from([1, 2, 4, 3]), "dim": st.sampled_from([4, 8, 16, 6]),
        "gate": st.sampled_from(["large", "middleY", "small", "none"])}))
near_rule = st.fixed_dictionaries({"select": near_selector, "insert": st.just("m0")}, optional={
    "placement": st.sampled_from(["after", "parallel"]), "optional": st.booleans(), "skip": st.booleans(),
    "with": params})
near_documents = st.fixed_dictionaries({
    "name": st.text(min_size=1, max_size=10), "methods": st.fixed_dictionaries({"m0": near_method}),
    "rules": st.lists(near_rule, min_size=1, max_size=3)}, optional={"trainable": st.lists(trainable, max_size=1)})

TOKENS = ["name: ", "methods:\n", "rules:\n", "trainable:\n", "  ", "\n", "- ", "{", "}", "[", "]", ", ", ": ",
          "? ", "&a ", "&b ", "*a", "*b", "<<: *a", "!!python/object/apply:os.system ['true']", "!!binary aGk=",
          "!!set ", "!!str ", "!!int ", "!tag ", "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "|\n",
          ">-\n", "'", '"', "#", "\t", "\x00", "\ufeff", "0x1F", "1_000", "0o17", ".nan", "-.inf", "1:30",
          "select: ", "layers: ", "insert: ", "type: vlpet", "dim: ", "heads: ", "9" * 50, "true", "null", "~"]

raw_text = st.lists(st.one_of(st.sampled_from(TOKENS), st.text(max_size=6)), max_size=40).map("".join)


def _laughs(levels: int, width: int) -> str:
    lines = ["name: &a0 lol"]
    for i in range(1, levels + 1):
        lines.append(f"l{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


bombs = st.builds(_laughs, st.integers(1, 14), st.integers(2, 16))


def _dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


@st.composite
def spliced(draw):
    """A structured document's YAML with YAML tokens spliced in at drawn places."""
    text = _dump(draw(documents))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(TOKENS)) + text[at:]
    return text


@pytest.fixture(scope="module")
def t5():
    model = build_model("t5", "tiny", device="meta")
    table = vlpet_fx.discover(build_model("t5", "tiny"), name="t5 (tiny)")
    return model, table


class _Hung(Exception):
    pass


class _watchdog:
    """A hard time bound (SIGALRM) for one example, so a regression fails the test instead of hanging it;
    Hypothesis' deadline is the finer bound."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.armed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")

    def _fire(self, *_):
        raise _Hung(f"one document took more than {self.seconds:.0f} s")

    def __enter__(self):
        if self.armed:
            self.old = signal.signal(signal.SIGALRM, self._fire)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.old)


class Checker:
    """Loads (and if it loads, plans) one document; only one-line VlpetErrors may come out. Memory is traced
    (tracemalloc) while the document is checked, not while Hypothesis generates it."""

    def __init__(self, model, table):
        self.model, self.table = model, table
        self.count = self.loaded = self.planned = 0

    def __call__(self, text: str) -> None:
        self.count += 1
        with _watchdog(4 * DEADLINE_MS / 1000):
            self._check(text)

    def _check(self, text: str) -> None:
        tracemalloc.start()
        try:
            rs = parse_rules(text, "fuzz.yaml")
            self.loaded += 1
            vlpet_fx.plan(self.model, rs, table=self.table)
            self.planned += 1
        except VlpetError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < PEAK_BYTES, f"{peak:,} bytes traced for one document"


def test_fuzz_structured_documents(t5):
    check = Checker(*t5)

    @settings(max_examples=1000, **SETTINGS)
    @given(st.one_of(documents, near_documents))
    def run(doc):
        check(_dump(doc))

    run()
    assert check.count >= 1000
    # the strategy reaches past the loader: many documents load and many of those plan
    assert check.loaded >= 200 and check.planned >= 100, (check.loaded, check.planned)


def test_fuzz_raw_and_spliced_text(t5):
    check = Checker(*t5)

    @settings(max_examples=600, **SETTINGS)
    @given(raw_text)
    def run_raw(text):
        check(text)

    @settings(max_examples=500, **SETTINGS)
    @given(spliced())
    def run_spliced(text):
        check(text)

    run_raw()
    run_spliced()
    assert check.count >= 1100


def test_fuzz_alias_bombs(t5):
    check = Checker(*t5)

    @settings(max_examples=60, **SETTINGS)
    @given(bombs)
    def run(text):
        check(text)

    run()
    assert check.count >= 60


BOUNDED = r"""
import json, resource, sys
from vlpet_fx.errors import VlpetError
from vlpet_fx.rules import parse_rules
texts = json.load(sys.stdin)
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), vm + (512 << 20)))  # 512 MiB more than now
refused = 0
for text in texts:
    try:
        parse_rules(text, "bomb.yaml")
    except VlpetError:
        refused += 1
print(refused)
"""


def test_alias_bombs_under_a_memory_limit():
    """The worst alias bombs (up to 16**14 values expanded) in a process whose address space may grow by only
    512 MiB after the imports: refused, no MemoryError, within the time limit."""
    texts = [_laughs(levels, width) for levels in (9, 12, 14) for width in (10, 16)]
    texts.append("a: &a [" + ", ".join(["x"] * 30) + "]\n" + "".join(
        f"b{i}: &b{i} {{k: *{'a' if i == 0 else f'b{i - 1}'}, j: *{'a' if i == 0 else f'b{i - 1}'}}}\n" for i in range(40)))
    res = subprocess.run([sys.executable, "-c", BOUNDED], input=json.dumps(texts), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert int(res.stdout.strip()) == len(texts)
