"""A vision-and-language encoder-decoder in the VL-Adapter set-up.

A frozen image encoder turns each image into a feature vector; a trainable visual projector (Linear + LayerNorm)
maps it to the text model's width; the projected visual tokens sit next to the text token embeddings at the
input of the text encoder; the decoder generates the answer (every task is text generation, the task named by a
text prefix such as ``vqa:``). Any module mapping images ``(N, 3, S, S)`` to features ``(N, F)`` or
``(N, T, F)`` is an image encoder (open_clip visual towers, EfficientNet, ...).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelSpecError


def image_size_of(visual: nn.Module) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def to_pixels(images: list, size: int, device=None) -> torch.Tensor:
    """uint8 images (H, W) or (H, W, 3) → float (N, 3, size, size), scaled to [-1, 1].

    Each image is resized on its own before the batch is stacked, so images of different sizes (and grey next
    to colour) batch together; for equally sized images the result equals resizing the stacked batch."""
    out = []
    for im in images:  # one at a time: the images may differ in size
        t = torch.from_numpy(np.array(im, dtype=np.float32))
        t = t.unsqueeze(0).expand(3, -1, -1) if t.dim() == 2 else t.permute(2, 0, 1)[:3]
        t = t.unsqueeze(0) / 127.5 - 1.0
        out.append(F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0])
    x = torch.stack(out)
    return x.to(device) if device is not None else x


class VLModel(nn.Module):
    """``visual`` (frozen by the rules) → ``visual_projection`` (trainable) → ``text`` (HF seq2seq)."""

    def __init__(self, visual: nn.Module, text: nn.Module, feature_dim: int, tokens_per_image: int | None = None):
        """``tokens_per_image``: concatenate each image's encoder tokens into this many visual tokens (their
        features side by side, nothing averaged away); ``None`` keeps every token."""
        super().__init__()
        d = text.get_input_embeddings().embedding_dim  # the width (EncoderDecoderConfig has no d_model)
        self.visual = visual
        self.text = text
        self.feature_dim = feature_dim
        self.image_size = image_size_of(visual)
        n = self._tokens_of_one_image()
        k = tokens_per_image or n
        if n % k:
            raise ModelSpecError(f"tokens_per_image={k} does not divide the encoder's {n} tokens per image")
        self.group = n // k
        self.tokens_per_image = k
        self.visual_projection = nn.Sequential(nn.Linear(feature_dim * self.group, d), nn.LayerNorm(d))

    def _tokens_of_one_image(self) -> int:
        p = next(self.visual.parameters())
        with torch.no_grad():
            x = torch.zeros(1, 1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
            return self.encode_images(x).shape[1]

    @property
    def config(self):
        return self.text.config

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, S, S) → features (B, K·T, F) from the image encoder."""
        b, k = pixel_values.shape[:2]
        feats = self.visual(pixel_values.flatten(0, 1))
        if isinstance(feats, (tuple, list)):  # (pooled, tokens): open_clip ViT with output_tokens
            feats = feats[1]
        if feats.dim() == 2:
            feats = feats.unsqueeze(1)
        return feats.reshape(b, k * feats.shape[1], feats.shape[-1])

    def embed(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None):
        """Text embeddings followed by visual tokens; ``visual_mask`` (B, K) marks padded image slots."""
        feats = visual_features if visual_features is not None else self.encode_images(pixel_values)
        if self.group > 1:  # consecutive tokens of one image side by side
            feats = feats.reshape(feats.shape[0], feats.shape[1] // self.group, self.group * feats.shape[2])
        vis = self.visual_projection(feats.to(self.visual_projection[0].weight.dtype))
        txt = self.text.get_input_embeddings()(input_ids)
        embeds = torch.cat([txt, vis.to(txt.dtype)], dim=1)
        if visual_mask is None:
            visual_mask = attention_mask.new_ones(vis.shape[:2])
        elif visual_mask.shape[1] != vis.shape[1]:  # one mask entry per image, several tokens per image
            visual_mask = visual_mask.repeat_interleave(vis.shape[1] // visual_mask.shape[1], dim=1)
        mask = torch.cat([attention_mask, visual_mask.to(attention_mask.dtype)], dim=1)
        return embeds, mask

    def forward(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None,
                decoder_input_ids=None, labels=None):
        embeds, mask = self.embed(input_ids, attention_mask, pixel_values, visual_features, visual_mask)
        return self.text(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids,
                         labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None,
                 **kwargs):
        embeds, mask = self.embed(input_ids, attention_mask, pixel_values, visual_features, visual_mask)
        return self.text.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def example_inputs(self):
        """For capture/discovery: 2 examples, 2 images each, 6 text tokens, 3 decoder tokens."""
        dev = next(self.parameters()).device
        vocab = self.text.get_input_embeddings().num_embeddings
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, vocab, (2, 6), generator=g).to(dev)
        pix = torch.randn(2, 2, 3, self.image_size, self.image_size, generator=g).to(dev)
        dec = torch.randint(3, vocab, (2, 3), generator=g).to(dev)
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix,
                    "decoder_input_ids": dec}
