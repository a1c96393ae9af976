"""The strict schema of ``vlpet.json`` (pydantic), and a bounded reader.

Everything a manifest says is checked here before any of it is used: the file must be a regular file of at most
:data:`MAX_MANIFEST_BYTES`, valid JSON without duplicate keys or NaN/Infinity, and match :class:`Manifest`
exactly (unknown keys refused, no type coercion, every string and number bounded, ``base.kind`` one of the known
kinds). The first problem becomes one :class:`~vlpet_fx.errors.ExportError` line naming the field and the fix.

A manifest never makes vlpet-fx import or call anything by itself: a ``factory`` base (and a ``vl`` base whose text
model is a ``module:factory``) is refused unless the caller passes the model or opts in (``trust_code=True``,
``--trust-factory``); see docs/SECURITY.md.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, JsonValue, StringConstraints, ValidationError

from ..errors import ExportError
from ..io import FileProblem, read_user_file

MANIFEST = "vlpet.json"
FORMAT = "vlpet-fx/adapters@1"
MAX_MANIFEST_BYTES = 32 << 20  # a large model's plan is well under 1 MB
MAX_RULES_TEXT = 1 << 20
MAX_INIT_FROM_DEPTH = 8

Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200)]
PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
SizeName = Literal["tiny", "small", "base", "large"]
# module path and attribute, as a user types it: `package.module:factory`
FactorySpec = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                                                       r":[A-Za-z_][A-Za-z0-9_]*$", max_length=400)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BuiltinBase(_Strict):
    kind: Literal["builtin"]
    spec: Name
    size: SizeName = "tiny"
    seed: Seed = 0


class DirectoryBase(_Strict):
    kind: Literal["directory"]
    spec: PathText


class FactoryBase(_Strict):
    kind: Literal["factory"]
    spec: FactorySpec


class VLBase(_Strict):
    kind: Literal["vl"]
    spec: Literal["vl"] = "vl"
    text: PathText
    size: SizeName = "tiny"
    visual: Name
    visual_size: PathText
    vocab_size: Annotated[int, Field(ge=1, le=10_000_000)]
    seed: Seed = 0
    # "words": a word-level tokenizer built from the task texts (embeddings resized to vocab_size);
    # "checkpoint": the text checkpoint directory's own tokenizer (embeddings kept)
    tokenizer: Literal["words", "checkpoint"] = "words"
    tokens_per_image: Annotated[int, Field(ge=1, le=65_536)] | None = None
    init_from: PathText | None = None


Base = Annotated[Union[BuiltinBase, DirectoryBase, FactoryBase, VLBase], Field(discriminator="kind")]


class Fingerprint(_Strict):
    config_sha256: Hex64
    frozen_weights_sha256: Hex64


class Rules(_Strict):
    name: Name
    source: PathText
    text: Annotated[str, StringConstraints(max_length=MAX_RULES_TEXT)]
    sha256: Hex64


class Versions(_Strict):
    vlpet_fx: Name
    torch: Name
    transformers: Name


class Manifest(_Strict):
    format: Literal["vlpet-fx/adapters@1"]
    base: Base
    fingerprint: Fingerprint
    rules: Rules
    # informational only (what was planned, with which method settings): never used to build anything;
    # `load` re-plans from `rules.text`, whose sha256 is checked
    methods: Annotated[dict[Name, dict[Name, JsonValue]], Field(max_length=1000)]
    plan: dict[Name, JsonValue]
    versions: Versions
    weights_sha256: Hex64


_FIXES = {
    "format": f"it must be {FORMAT!r}: give a directory written by `vlpet-fx patch --out` or `vlpet-fx export "
              "--format adapters`",
    "base": "write the directory again with `vlpet-fx patch --out`",
    "rules.sha256": "the directory was written by an older vlpet-fx or edited: write it again",
}


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _field(loc: tuple) -> str:
    # drop pydantic's union-tag component (e.g. base.factory.spec -> base.spec)
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "base" and parts[1] in ("builtin", "directory", "factory", "vl"):
        parts = [parts[0], *parts[2:]]
    return ".".join(parts) or "(top level)"


def _describe(err: dict) -> str:
    field = _field(err["loc"])
    kind = err["type"]
    if kind == "missing":
        what = f"field '{field}' is missing"
    elif kind == "extra_forbidden":
        what = f"field '{field}' is not part of the format"
    elif kind == "union_tag_invalid":
        what = (f"'{field}.kind' is {err['input'].get('kind')!r}: the known kinds are builtin, directory, factory, "
                "vl") if isinstance(err.get("input"), dict) else f"field '{field}' has an unknown kind"
    elif kind == "union_tag_not_found":
        what = f"field '{field}.kind' is missing"
    elif kind == "literal_error" and field == "format":
        what = f"'format' is {err['input']!r}"
    elif kind == "string_pattern_mismatch":
        shape = "package.module:factory" if field == "base.spec" else "64 lowercase hexadecimal digits"
        shown = err["input"] if len(err["input"]) < 60 else err["input"][:57] + "..."
        what = f"field '{field}' is invalid (it must be {shape}; got {shown!r})"
    else:
        got = err.get("input")
        short = isinstance(got, (int, float, bool, type(None))) or (isinstance(got, str) and len(got) < 60)
        shown = repr(got) if short else type(got).__name__
        msg = err["msg"][:1].lower() + err["msg"][1:]
        what = f"field '{field}' is invalid ({msg}; got {shown})"
    fix = _FIXES.get(field, "the file was edited or damaged: write the directory again")
    return f"{what}; {fix}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _file_problem_line(p: FileProblem, what: str) -> str:
    f = p.path
    return {
        "missing": f"'{f}' is missing: give a directory written by `vlpet-fx patch --out` or "
                   "`vlpet-fx export --format adapters`",
        "unreadable": f"cannot read '{f}': {p.detail}; a {what} must be a readable regular file",
        "directory": f"'{f}' is a directory, not a {what} file: the directory is damaged, write it again",
        "special": f"'{f}' is not a regular file (a fifo, socket or device): a {what} must be a file",
        "too_large": f"'{f}' is {p.size:,} bytes, more than a {what} can be ({p.limit:,}): the file is not what "
                     "vlpet-fx wrote; write the directory again",
        "grew": f"'{f}' grew past {p.limit:,} bytes while being read: it is not a {what}",
    }[p.kind]


def read_json_file(f: Path, limit: int, what: str) -> Any:
    """A regular file of at most ``limit`` bytes, as strict JSON; every failure is one ExportError line."""
    try:
        raw = read_user_file(f, limit)
    except FileProblem as p:
        raise ExportError(_file_problem_line(p, what)) from None
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise ExportError(f"cannot read '{f}': JSON nested too deeply; the file is damaged, write it again") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError; so are huge integers
        if "integer string conversion" in str(exc):
            raise ExportError(f"cannot read '{f}': it holds an integer with thousands of digits; the file is "
                              "damaged, write it again") from None
        raise ExportError(f"cannot read '{f}': {str(exc).splitlines()[0]}; the file is damaged, write it again") \
            from None


def check_written(doc: dict) -> Manifest:
    """Validate a manifest about to be written (a failure here is a bug or an unusual base reference)."""
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ExportError(f"cannot write {MANIFEST}: field '{_field(err['loc'])}' would be invalid "
                          f"({err['msg']})") from None


def validate_manifest(src: str | Path) -> Manifest:
    """Read and validate ``src/vlpet.json``."""
    src = Path(src)
    if not src.is_dir():
        if src.exists():
            raise ExportError(f"'{src}' is a file, not a vlpet-fx directory: give the directory written by "
                              "`vlpet-fx patch --out` or `vlpet-fx export --format adapters`")
        raise ExportError(f"'{src}' does not exist (no {MANIFEST}): give a directory written by `vlpet-fx patch "
                          "--out` or `vlpet-fx export --format adapters`")
    f = src / MANIFEST
    if not f.exists() and not f.is_symlink():
        raise ExportError(f"'{src}' is not a vlpet-fx directory (no {MANIFEST}): give a directory written by "
                          "`vlpet-fx patch --out` or `vlpet-fx export --format adapters`")
    doc = read_json_file(f, MAX_MANIFEST_BYTES, "manifest")
    if not isinstance(doc, dict):
        raise ExportError(f"'{f}' holds a JSON {type(doc).__name__}, not an object: the file is damaged, write it "
                          "again")
    if "format" in doc and doc["format"] != FORMAT:
        raise ExportError(f"'{f}' has format {doc['format']!r}, expected {FORMAT!r}: give a directory written by "
                          "`vlpet-fx patch --out` or `vlpet-fx export --format adapters`")
    try:
        manifest = Manifest.model_validate(doc)
    except ValidationError as exc:
        raise ExportError(f"'{f}': {_describe(exc.errors()[0])}") from None
    if sha256_text(manifest.rules.text) != manifest.rules.sha256:
        raise ExportError(f"'{f}': the rules text was edited after the directory was written (its sha256 differs "
                          "from rules.sha256): restore it, or patch again with the edited rules")
    return manifest
