"""Load a trained VL model and its tokenizer for answering: from a ``train`` run directory, a patched directory or
an adapters directory (with its base model rebuilt from the manifest, or given)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import VlpetError

TOKENIZER_DIR = "tokenizer"


def is_run_dir(path: Path) -> bool:
    """A finished ``vlpet-fx train`` run: run.json, model/ (a patched directory) and tokenizer/."""
    return (path / "run.json").is_file() and (path / "model" / "vlpet.json").is_file()


def model_dir_of(src: str | Path) -> Path:
    """The patched directory inside ``src``: ``src/model`` for a run, ``src`` itself otherwise."""
    src = Path(src)
    return src / "model" if is_run_dir(src) else src


def tokenizer_dir_of(src: str | Path) -> Path | None:
    src = Path(src)
    for cand in (src / TOKENIZER_DIR, src.parent / TOKENIZER_DIR if src.name == "model" else None):
        if cand is not None and (cand / "tokenizer.json").is_file():
            return cand
    return None


def load_tokenizer(path: str | Path):
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise VlpetError(f"'{path}' holds no tokenizer.json: give a train run's tokenizer/ directory")
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # tokenizers/transformers raise several types for a damaged file
        raise VlpetError(f"cannot read the tokenizer in '{path}': {str(exc).splitlines()[0] if str(exc) else exc}; "
                         "write it again") from None


def load_base_model(src: str | Path, *, device: str | None = None, force: bool = False) -> nn.Module:
    """A base model for an adapters directory: the trained model of a full fine-tuning run (or of a patched
    directory) with nothing PET attached."""
    from ..export import load

    model = load(model_dir_of(src), force=force, device=device)
    if model.vlpet_patch.attached:
        raise VlpetError(f"base '{src}' carries PET modules; give a full fine-tuning run (or an unpatched model) "
                         "as the base")
    del model.vlpet_patch
    return model


def load_for_inference(src: str | Path, *, base: "nn.Module | str | Path | None" = None,
                       tokenizer: "str | Path | object | None" = None, device: str | None = None,
                       force: bool = False):
    """(patched model in eval mode, tokenizer) from ``src``: a run directory, a patched directory or an adapters
    directory. ``base`` replaces the base model the manifest names (an ``nn.Module``, or a run/patched
    directory); ``tokenizer`` is a directory (default: ``src/tokenizer`` or the run's) or a tokenizer object."""
    from ..export import load
    from ..vl.model import VLModel

    src = Path(src)
    if not src.is_dir():
        raise VlpetError(f"'{src}' is not a directory: give a train run, a patched or an adapters directory")
    mdir = model_dir_of(src)
    if isinstance(base, (str, Path)):
        base = load_base_model(base, device=device, force=force)
    model = load(base, mdir, force=force, device=device) if base is not None else load(mdir, force=force,
                                                                                         device=device)
    if not isinstance(model, VLModel):
        raise VlpetError(f"'{src}' holds a {type(model).__name__}, not a vision-and-language model: predict, evaluate "
                         "and serve answer questions about images with a model trained by `vlpet-fx train`")
    if device is not None:
        model.to(device)
    if tokenizer is None:
        found = tokenizer_dir_of(src)
        if found is None:
            raise VlpetError(f"no tokenizer next to '{src}': pass the training run's tokenizer/ directory "
                             "(--tokenizer DIR)")
        tokenizer = found
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    vocab = model.text.get_input_embeddings().num_embeddings
    if len(tok) > vocab:
        raise VlpetError(f"the tokenizer has {len(tok)} tokens but the model only {vocab}: give the tokenizer of the "
                         "run that trained this model")
    return model.eval(), tok
