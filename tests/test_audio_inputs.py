"""Example inputs of audio LLMs (audio encoder -> projector -> language model with audio placeholder tokens).

The frame count and layout are the ones the model's own ``get_audio_features`` takes, and the number of
placeholder tokens is the number of embeddings it makes; the expectations here come from closed forms of each
encoder's arithmetic (windows, strided convolutions, frame stacking), never from running the builder's code.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vlpet_fx.capture.inputs import BATCH, build_example_inputs


class Cfg:
    """A minimal config: plain attributes, sub-configs recognised by ``to_dict`` and ``model_type``."""

    def __init__(self, model_type: str, **kw):
        self.model_type = model_type
        self.__dict__.update(kw)

    def to_dict(self) -> dict:
        return dict(vars(self))


class Lengths(nn.Module):
    """An audio tower whose length formula disagrees with what it computes (one embedding per frame): the
    builder must count with ``get_audio_features`` whenever that can be called."""

    def __init__(self, mel: int, width: int):
        super().__init__()
        self.proj = nn.Linear(2 * mel, width)

    def _get_feat_extract_output_lengths(self, lengths):
        return lengths


class ToyAudioLLM(nn.Module):
    """Features (B, frames, mel) in windows of ``2 * n_window`` frames; each pair of frames -> one embedding.

    ``get_audio_features`` hands ``speaker_mask`` on through ``**kwargs`` to an encoder that requires it (the forward
    passes its default, None). Without ``with_get`` the model has no ``get_audio_features``: the builder then counts
    with the tower's length formula, made right for that case (``frames // 2``), and the model takes (B, mel, frames)
    of any even length.
    """

    def __init__(self, with_get: bool = True):
        super().__init__()
        self.config = Cfg("toy", vocab_size=40, audio_token_id=39,
                          audio_config=Cfg("toy_audio", num_mel_bins=6, n_window=5, hidden_size=16))
        a = self.config.audio_config
        self.window = 2 * a.n_window if with_get else 2  # without the method: any even frame count
        self.tower = Lengths(a.num_mel_bins, a.hidden_size)
        if not with_get:
            self.tower._get_feat_extract_output_lengths = lambda lengths: lengths // 2
            self.get_audio_features = None
        self.embed = nn.Embedding(self.config.vocab_size, a.hidden_size)
        self.head = nn.Linear(a.hidden_size, self.config.vocab_size)

    def get_input_embeddings(self):
        return self.embed

    def _encode(self, features, mask, speaker_mask):
        b, frames, mel = features.shape
        window = self.window
        if mel != self.config.audio_config.num_mel_bins or frames % window:
            raise ValueError(f"expected (B, k * {window}, mel) features, got {tuple(features.shape)}")
        return self.tower.proj(features.reshape(b * frames // 2, 2 * mel))

    def get_audio_features(self, input_features, input_features_mask, **kwargs):
        return SimpleNamespace(pooler_output=self._encode(input_features, input_features_mask, **kwargs))

    def forward(self, input_ids, input_features=None, input_features_mask=None, speaker_mask=None,
                attention_mask=None, use_cache=None):
        x = self.embed(input_ids)
        if input_features is not None:
            if self.get_audio_features is None:  # the other layout, without the method
                audio = self._encode(input_features.transpose(1, 2), input_features_mask, speaker_mask)
            else:
                audio = self.get_audio_features(input_features, input_features_mask, speaker_mask=speaker_mask
                                                ).pooler_output
            slots = input_ids == self.config.audio_token_id
            if int(slots.sum()) != audio.shape[0]:
                raise ValueError(f"{int(slots.sum())} audio tokens for {audio.shape[0]} audio embeddings")
            x = x.masked_scatter(slots[..., None].expand_as(x), audio)
        return self.head(x)


def _audio_tokens(model, kwargs) -> list[int]:
    return (kwargs["input_ids"] == model.config.audio_token_id).sum(-1).tolist()


def test_frames_layout_and_count_come_from_get_audio_features():
    model = ToyAudioLLM()
    _, args, kwargs = build_example_inputs(model)
    window, mel = 2 * model.config.audio_config.n_window, model.config.audio_config.num_mel_bins
    frames = kwargs["input_features"].shape[1]
    assert kwargs["input_features"].shape == (BATCH, frames, mel)  # the (B, frames, mel) layout
    assert frames == window  # the window the audio config names (64 frames, the first choice, is no multiple)
    assert kwargs["input_features_mask"].shape == (BATCH, frames)
    assert _audio_tokens(model, kwargs) == [frames // 2] * BATCH  # not the tower's formula (one per frame)
    with torch.no_grad():
        assert model(*args, **kwargs).shape[:2] == kwargs["input_ids"].shape


def test_the_length_formula_counts_when_there_is_no_get_audio_features():
    model = ToyAudioLLM(with_get=False)
    _, args, kwargs = build_example_inputs(model)
    mel, frames = model.config.audio_config.num_mel_bins, 64  # no window is tried without the method: the first
    assert kwargs["input_features"].shape == (BATCH, mel, frames)
    assert _audio_tokens(model, kwargs) == [frames // 2] * BATCH
    with torch.no_grad():
        model(*args, **kwargs)


class ToyWaveLLM(nn.Module):
    """A raw waveform (B, 1, samples) through a strided 1-D convolution (hop 5): one embedding per hop."""

    HOP = 5

    def __init__(self):
        super().__init__()
        self.config = Cfg("toy", vocab_size=40, audio_token_id=38, audio_config=Cfg("toy_audio", hidden_size=16))
        self.conv = nn.Conv1d(1, 16, kernel_size=self.HOP, stride=self.HOP)
        self.embed = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40)

    def get_input_embeddings(self):
        return self.embed

    def get_audio_features(self, input_values, padding_mask=None, **kwargs):
        if input_values.dim() != 3:
            raise ValueError("expected (B, 1, samples)")
        return SimpleNamespace(pooler_output=self.conv(input_values).transpose(1, 2).flatten(0, 1))

    def forward(self, input_ids, input_values=None, padding_mask=None, attention_mask=None):
        x = self.embed(input_ids)
        if input_values is not None:
            audio = self.get_audio_features(input_values, padding_mask).pooler_output
            slots = input_ids == self.config.audio_token_id
            if int(slots.sum()) != audio.shape[0]:
                raise ValueError(f"{int(slots.sum())} audio tokens for {audio.shape[0]} audio embeddings")
            x = x.masked_scatter(slots[..., None].expand_as(x), audio)
        return self.head(x)


def test_a_waveform_for_models_that_take_input_values():
    model = ToyWaveLLM()
    _, args, kwargs = build_example_inputs(model)
    samples = kwargs["input_values"].shape[-1]
    assert kwargs["input_values"].shape == (BATCH, 1, samples) and samples % model.HOP == 0
    assert _audio_tokens(model, kwargs) == [samples // model.HOP] * BATCH
    with torch.no_grad():
        model(*args, **kwargs)


transformers = pytest.importorskip("transformers")


def _build(model_type: str):
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(tiny_config(model_type)).eval()


def _halve(n: int) -> int:  # a kernel-3, stride-2, padding-1 convolution
    return (n - 1) // 2 + 1


def _check_runs(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    assert out.logits.shape[:2] == kwargs["input_ids"].shape


def test_qwen3_asr_windows_of_the_encoder():
    """100-frame windows (twice ``n_window``), three stride-2 convolutions per window: 13 embeddings each."""
    model = _build("qwen3_asr")
    _, args, kwargs = build_example_inputs(model)
    audio = model.config.audio_config
    _, mel, frames = kwargs["input_features"].shape
    assert mel == audio.num_mel_bins and frames % (2 * audio.n_window) == 0
    per_window = _halve(_halve(_halve(2 * audio.n_window)))
    assert _audio_tokens(model, kwargs) == [frames // (2 * audio.n_window) * per_window] * BATCH
    _check_runs(model, args, kwargs)


def test_nemo_speechlm_stacked_frames():
    """(B, frames, mel) features, ``subsampling_factor`` frames stacked into one embedding."""
    model = _build("nemo_speechlm")
    _, args, kwargs = build_example_inputs(model)
    audio = model.config.audio_config
    _, frames, mel = kwargs["input_features"].shape
    assert mel == audio.asr_config.num_mel_bins
    assert _audio_tokens(model, kwargs) == [math.ceil(frames / audio.asr_config.subsampling_factor)] * BATCH
    _check_runs(model, args, kwargs)


def test_moss_transcribe_diarize_merged_frames():
    """A Whisper window (``max_source_positions`` after a stride-2 convolution), ``audio_merge_size`` frames per
    embedding; the forward's ``padding_mask`` (default None) is not needed to count them."""
    model = _build("moss_transcribe_diarize")
    _, args, kwargs = build_example_inputs(model)
    positions = model.config.audio_config.max_source_positions
    _, mel, frames = kwargs["input_features"].shape
    assert mel == model.config.audio_config.num_mel_bins and frames == 2 * positions
    assert _audio_tokens(model, kwargs) == [math.ceil(_halve(frames) / model.config.audio_merge_size)] * BATCH
    _check_runs(model, args, kwargs)


def test_omniasr_waveform_through_the_feature_encoder():
    """Raw samples through the convolutional feature encoder: one embedding per output frame of its convolutions
    (no padding), from the config's kernels and strides."""
    model = _build("omniasr")
    _, args, kwargs = build_example_inputs(model)
    audio = model.config.audio_config
    n = kwargs["input_values"].shape[-1]
    for kernel, stride in zip(audio.conv_kernel, audio.conv_stride):
        n = (n - kernel) // stride + 1
    assert n > 0 and _audio_tokens(model, kwargs) == [n] * BATCH
    _check_runs(model, args, kwargs)


class InnerAudio(nn.Module):
    """An inner multimodal model that holds ``get_audio_features``: (B, frames, feat) features, every 4 frames one
    embedding; the mask is a padding mask (True = padded), as the outer forward hands on ``~mask``."""

    def __init__(self, feat: int, width: int):
        super().__init__()
        self.proj = nn.Linear(4 * feat, width)

    def get_audio_features(self, input_features, input_features_mask):
        b, frames, feat = input_features.shape
        if frames % 4 or input_features_mask.shape != (b, frames):
            raise ValueError(f"expected (B, 4k, feat) and a (B, frames) mask, got {tuple(input_features.shape)}")
        return SimpleNamespace(pooler_output=self.proj(input_features.reshape(b, frames // 4, 4 * feat)))


class PaddedAudioLLM(nn.Module):
    """A conditional-generation wrapper without ``get_audio_features`` of its own; the mel setting is called
    ``input_feat_size``; the forward pads the audio embeddings up to the config's ``audio_soft_tokens_per_image``
    and wants that many placeholders. Its image encoder takes no pixels at all (``pixel_values`` must stay None),
    and the model runs on text and audio alone."""

    SOFT = 21  # more than the 16 embeddings of 64 frames

    def __init__(self):
        super().__init__()
        self.config = Cfg("toy", vocab_size=40, audio_token_id=37, image_token_id=36,
                          audio_soft_tokens_per_image=self.SOFT,
                          audio_config=Cfg("toy_audio", input_feat_size=6, hidden_size=16),
                          vision_config=Cfg("toy_vision", hidden_size=16))
        self.model = InnerAudio(self.config.audio_config.input_feat_size, 16)
        self.embed = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40)

    def get_input_embeddings(self):
        return self.embed

    def get_image_features(self, pixel_values):
        raise RuntimeError("this image encoder takes no pixels")

    def forward(self, input_ids, pixel_values=None, input_features=None, attention_mask=None,
                input_features_mask=None, use_cache=None):
        if pixel_values is not None:
            self.get_image_features(pixel_values)
        x = self.embed(input_ids)
        if input_features is not None and input_features_mask is not None:
            audio = self.model.get_audio_features(input_features, ~input_features_mask).pooler_output
            b, n, d = audio.shape
            if n > self.SOFT:
                raise ValueError(f"{n} audio embeddings, more than {self.SOFT}")
            audio = torch.cat([audio, audio.new_zeros(b, self.SOFT - n, d)], dim=1)  # padded to the set count
            slots = input_ids == self.config.audio_token_id
            if int(slots.sum()) != audio.shape[0] * audio.shape[1]:
                raise ValueError(f"{int(slots.sum())} audio tokens for {audio.shape[0] * audio.shape[1]} embeddings")
            x = x.masked_scatter(slots[..., None].expand_as(x), audio)
        return self.head(x)


def test_inner_get_audio_features_input_feat_size_and_a_padded_token_count():
    model = PaddedAudioLLM()
    _, args, kwargs = build_example_inputs(model)
    feat = model.config.audio_config.input_feat_size
    _, frames, got = kwargs["input_features"].shape
    assert got == feat and frames % 4 == 0  # (B, frames, feat), the layout the inner method takes
    assert kwargs["input_features_mask"].shape == (BATCH, frames)
    assert _audio_tokens(model, kwargs) == [model.SOFT] * BATCH  # the config's count, not frames // 4
    assert "pixel_values" not in kwargs  # the image encoder took none of the layouts: text and audio only
    with torch.no_grad():
        assert model(*args, **kwargs).shape[:2] == kwargs["input_ids"].shape


class NeedsImages(PaddedAudioLLM):
    """The same model, whose forward refuses to run without images."""

    def forward(self, input_ids, pixel_values=None, input_features=None, attention_mask=None,
                input_features_mask=None, use_cache=None):
        if pixel_values is None:
            raise ValueError("this model needs images")
        return super().forward(input_ids, pixel_values, input_features, attention_mask, input_features_mask)


def test_no_inputs_when_the_forward_needs_the_images_it_cannot_get():
    assert build_example_inputs(NeedsImages()) is None


@pytest.mark.slow
def test_gemma3n_audio_and_text():
    """gemma3n: the conformer's ``get_audio_features`` sits on the inner model, the mel setting is
    ``input_feat_size``, and the forward pads the audio embeddings to ``audio_soft_tokens_per_image``."""
    from vlpet_fx.zoo.tiny import tiny_config

    torch.manual_seed(0)
    config = tiny_config("gemma3n")
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    _, args, kwargs = build_example_inputs(model)
    assert kwargs["input_features"].shape[-1] == config.audio_config.input_feat_size
    assert _audio_tokens(model, kwargs) == [config.audio_soft_tokens_per_image] * BATCH
    _check_runs(model, args, kwargs)
