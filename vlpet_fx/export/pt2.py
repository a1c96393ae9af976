"""``pt2``: the patched model exported with ``torch.export`` (dynamic batch and sequence dimensions).

    model.pt2     the full forward used for scoring: (input_ids, attention_mask, decoder_input_ids) -> logits
    encoder.pt2   (input_ids, attention_mask) -> encoder hidden states
    decoder.pt2   one generation step without a KV cache: (decoder_input_ids, encoder_hidden_states,
                  attention_mask) -> logits of the last position

The decoder step recomputes the decoder over the prefix at every step: exporting Hugging Face's cache objects
as graph inputs/outputs is not supported here (see docs/EXPORT.md). Load with :func:`load_pt2` (scans the archive
and refuses anything torch would unpickle or run; plain ``torch.export.load`` unpickles entries marked so).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from ..errors import ExportError
from .atomic import atomic_dir

MAX_LEN = 4096


class ScoreForward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                          use_cache=False).logits


class EncoderForward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, decoder_input_ids, encoder_hidden_states, attention_mask):
        from transformers.modeling_outputs import BaseModelOutput

        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                         attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False)
        return out.logits[:, -1]


def example(model: nn.Module, batch: int = 2, src: int = 9, tgt: int = 5):
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch, src), generator=g).to(device)
    dec = torch.randint(3, vocab, (batch, tgt), generator=g).to(device)
    return ids, torch.ones_like(ids), dec


def export_programs(model: nn.Module) -> dict[str, torch.export.ExportedProgram]:
    """The programs of ``model`` (see the module doc); ExportError (one line) when torch.export cannot make them."""
    from ..capture.tracer import _module_tracker, _no_op_conversions
    from ..vl.model import VLModel

    if isinstance(model, VLModel):  # images next to the text: see pt2_vl
        from .pt2_vl import export_vl_programs

        exporter = export_vl_programs
    else:
        exporter = _export_text_programs
    stack: list[str] = []
    try:
        # a module converting itself to the dtype it already has (a router's classifier) is a no-op here, as in
        # capture; the tracker names the module a failure happens in; torch.export's report of a failure (the
        # partial graph, on stderr and in its logs) is replaced by one line
        with _quiet_export(model), _module_tracker(model) as stack, _no_op_conversions(model), \
                contextlib.redirect_stderr(io.StringIO()):
            return exporter(model.eval())
    except ExportError:
        raise
    except Exception as exc:  # torch.export's own errors are long: one line naming the cause
        raise _export_failure(model, exc, stack[-1] if stack else "") from None


def _export_failure(model: nn.Module, exc: BaseException, where: str) -> ExportError:
    from ..capture.tracer import _first_line, data_dependent, user_line

    if data_dependent(exc):
        at = user_line(exc)
        who = f"module '{where}' ({type(model.get_submodule(where)).__name__})" if where else "the forward"
        return ExportError(
            f"cannot export to .pt2: {who} depends on tensor values{f' ({at})' if at else ''}, which torch.export "
            "cannot turn into a program for every input (capture keeps such a module as one opaque call, which runs "
            "only in the process that captured it and cannot be saved); export with --format adapters instead")
    inside = f" in module '{where}'" if where else ""
    return ExportError(f"torch.export could not export the patched model{inside}: {type(exc).__name__}: "
                       f"{_first_line(exc)}; export with --format adapters instead")


def _export_text_programs(model: nn.Module) -> dict[str, torch.export.ExportedProgram]:
    if not (hasattr(model, "config") and getattr(model.config, "is_encoder_decoder", False)):
        raise ExportError("--format pt2 needs a Hugging Face encoder-decoder (it exports scoring, encoder and "
                          "decoder-step programs); use --format adapters for other models")
    ids, mask, dec = example(model)
    return _export_all(model, ids, mask, dec)


@contextlib.contextmanager
def _quiet_export(model: nn.Module):
    from ..capture.tracer import _NOISY_LOGGERS

    quiet = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # VL-PET's gates receive the block input through an attribute set by a pre-hook; export traces
            # through it (the value flows in the graph) and warns that the attribute is not a buffer
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            yield
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
        for m in model.modules():
            if getattr(m, "block_input", None) is not None:
                m.block_input = None  # drop the tracing-time tensors


def _export_all(model, ids, mask, dec) -> dict[str, torch.export.ExportedProgram]:
    batch, src, tgt = Dim("batch", min=1, max=1024), Dim("src", min=2, max=MAX_LEN), Dim("tgt", min=1, max=MAX_LEN)
    enc = EncoderForward(model)(ids, mask)
    return {
        "model": torch.export.export(ScoreForward(model), (ids, mask, dec), strict=False,
                                     dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: src}, {0: batch, 1: tgt})),
        "encoder": torch.export.export(EncoderForward(model), (ids, mask), strict=False,
                                       dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: src})),
        "decoder": torch.export.export(DecoderStep(model), (dec, enc, mask), strict=False,
                                       dynamic_shapes=({0: batch, 1: tgt}, {0: batch, 1: src}, {0: batch, 1: src})),
    }


def write_pt2(model: nn.Module, manifest: dict, out: str | Path) -> None:
    programs = export_programs(model)
    with atomic_dir(out) as tmp:
        for name, ep in programs.items():
            torch.export.save(ep, str(tmp / f"{name}.pt2"))


MAX_PT2_BYTES = 64 << 30


def load_pt2(path: str | Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` made safe for a file from elsewhere: the archive is scanned first and refused (one line
    naming the entry and why) if torch would unpickle, exec or eval anything in it, and the load itself runs with
    every ``torch.load`` forced to ``weights_only=True`` (see pt2_safety.py and docs/SECURITY.md)."""
    from ..io import FileProblem, read_user_file
    from .pt2_safety import restricted_unpickling, scan_pt2

    path = Path(path)
    try:
        data = read_user_file(path, MAX_PT2_BYTES)
    except FileProblem as p:
        kind = "a directory" if p.kind == "directory" else "not a regular file"
        raise ExportError({
            "missing": f"'{path}' does not exist",
            "unreadable": f"cannot read '{path}': {p.detail}",
            "directory": f"'{path}' is {kind}: give a .pt2 file written by `vlpet-fx export --format pt2`",
            "special": f"'{path}' is {kind}: give a .pt2 file written by `vlpet-fx export --format pt2`",
            "too_large": f"'{path}' is larger than {MAX_PT2_BYTES:,} bytes: refusing to load it",
            "grew": f"'{path}' grew past {MAX_PT2_BYTES:,} bytes while it was read: refusing to load it",
        }[p.kind]) from None
    scan_pt2(data, str(path))
    try:
        with restricted_unpickling(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:
        raise ExportError(f"cannot load '{path}' as a torch.export program: {type(exc).__name__}; the file is damaged "
                          "or not a .pt2 export") from None
