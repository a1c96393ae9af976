"""A vision-and-language encoder-decoder in the VL-Adapter set-up.

A frozen image encoder turns each image into feature tokens; the authors' trainable visual embedding
(:mod:`vlpet_fx.vl.embedding`: feature + box + image order, normalised as the text model normalises) maps them to
the text model's width; the visual tokens follow the text tokens at the input of the text encoder, joining after
the text's embedding pipeline (BART: positions and ``layernorm_embedding`` for the text only); the decoder
generates the answer (every task is text generation, the task named by a text prefix such as ``vqa:``). Any
module mapping images ``(N, 3, S, S)`` to features ``(N, F)`` or ``(N, T, F)`` is an image encoder (open_clip
visual towers, EfficientNet, ...); one whose T tokens are patches declares ``token_grid = (rows, cols)``
(row-major), so each token carries its patch's box; without it every token carries the whole image's box.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelSpecError
from .embedding import EncoderJoin, VisualEmbedding, init_like, norm_like, token_boxes, token_grid_of

# images of one example the image-order embedding tells apart: the most a data row may hold
# (vlpet_fx.data.jsonl.MAX_IMAGES_PER_ROW; tests/test_vl_embedding.py keeps the two equal)
MAX_IMAGES = 32


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
    """``visual`` (frozen by the rules) → ``visual_projection`` (the authors' visual embedding, trainable) →
    ``text`` (HF seq2seq), the visual tokens joining the text encoder after its embedding pipeline."""

    def __init__(self, visual: nn.Module, text: nn.Module, feature_dim: int, tokens_per_image: int | None = None,
                 max_images: int = MAX_IMAGES):
        """``tokens_per_image``: concatenate each image's encoder tokens into this many visual tokens (their
        features side by side, nothing averaged away); ``None`` keeps every token. ``max_images``: how many
        images of one example the image-order embedding tells apart."""
        super().__init__()
        if not 1 <= max_images <= 4096:
            raise ModelSpecError(f"max_images={max_images} must be in 1..4096")
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
        grid = token_grid_of(visual, n)
        self.visual_projection = VisualEmbedding(feature_dim * self.group, d, norm_like(text, d), max_images)
        init_like(text, self.visual_projection)
        # one image's token boxes (x1, y1, x2, y2, area): computed from the encoder's layout, never stored
        self.register_buffer("token_boxes", token_boxes(n, grid, self.group).to(
            device=self.visual_projection.img_order_embedding.weight.device), persistent=False)
        self.join = EncoderJoin(text, d)

    def _tokens_of_one_image(self) -> int:
        p = next(self.visual.parameters())
        with torch.no_grad():
            x = torch.zeros(1, 1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
            return self.encode_images(x).shape[1]

    @property
    def config(self):
        return self.text.config

    @property
    def max_images(self) -> int:
        return self.visual_projection.max_images

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, S, S) → features (B, K·T, F) from the image encoder."""
        b, k = pixel_values.shape[:2]
        feats = self.visual(pixel_values.flatten(0, 1))
        if isinstance(feats, (tuple, list)):  # (pooled, tokens): open_clip ViT with output_tokens
            feats = feats[1]
        if feats.dim() == 2:
            feats = feats.unsqueeze(1)
        return feats.reshape(b, k * feats.shape[1], feats.shape[-1])

    def visual_tokens(self, pixel_values=None, visual_features=None) -> torch.Tensor:
        """The visual tokens (B, K·tokens_per_image, d): feature + box + image-order embeddings."""
        feats = visual_features if visual_features is not None else self.encode_images(pixel_values)
        if self.group > 1:  # consecutive tokens of one image side by side
            feats = feats.reshape(feats.shape[0], feats.shape[1] // self.group, self.group * feats.shape[2])
        k = self.tokens_per_image
        images = feats.shape[1] // k
        if images > self.max_images:
            raise ModelSpecError(f"{images} images in one example, but this model tells at most {self.max_images} "
                                 "apart: give fewer images per example")
        boxes = self.token_boxes.repeat(images, 1)
        order = torch.arange(images, device=feats.device).repeat_interleave(k)
        return self.visual_projection(feats.to(self.token_boxes.dtype), boxes, order)

    def _visual_and_mask(self, attention_mask, pixel_values, visual_features, visual_mask):
        vis = self.visual_tokens(pixel_values, visual_features)
        if visual_mask is None:
            visual_mask = attention_mask.new_ones(vis.shape[:2])
        elif visual_mask.shape[1] != vis.shape[1]:  # one mask entry per image, several tokens per image
            visual_mask = visual_mask.repeat_interleave(vis.shape[1] // visual_mask.shape[1], dim=1)
        return vis, torch.cat([attention_mask, visual_mask.to(attention_mask.dtype)], dim=1)

    def embed(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None):
        """Text token embeddings followed by the visual tokens, and their mask; ``visual_mask`` (B, K) marks
        padded image slots. (The encoder reads them through :meth:`encode`: the visual tokens join after the
        text's embedding pipeline.)"""
        vis, mask = self._visual_and_mask(attention_mask, pixel_values, visual_features, visual_mask)
        txt = self.text.get_input_embeddings()(input_ids)
        return torch.cat([txt, vis.to(txt.dtype)], dim=1), mask

    @contextlib.contextmanager
    def _encoder_inputs(self, input_ids, attention_mask, pixel_values, visual_features, visual_mask):
        """``(inputs_embeds, mask)`` for the text model, with the visual tokens joined where :attr:`join` says
        while the context is active."""
        vis, mask = self._visual_and_mask(attention_mask, pixel_values, visual_features, visual_mask)
        txt = self.text.get_input_embeddings()(input_ids)
        if self.join.path is None:
            yield torch.cat([txt, vis.to(txt.dtype)], dim=1), mask
            return
        tail = txt.new_zeros(vis.shape) if self.join.mode == "after_pipeline" else vis.to(txt.dtype)
        with self.join.joined(self.text.get_encoder(), vis):
            yield torch.cat([txt, tail], dim=1), mask

    def encode(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None):
        """The text encoder's output over text then visual tokens, and its attention mask."""
        with self._encoder_inputs(input_ids, attention_mask, pixel_values, visual_features, visual_mask) as (x, m):
            return self.text.get_encoder()(inputs_embeds=x, attention_mask=m).last_hidden_state, m

    def forward(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None,
                decoder_input_ids=None, labels=None):
        with self._encoder_inputs(input_ids, attention_mask, pixel_values, visual_features, visual_mask) as (x, m):
            return self.text(inputs_embeds=x, attention_mask=m, decoder_input_ids=decoder_input_ids, labels=labels,
                             use_cache=False)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, visual_features=None, visual_mask=None,
                 **kwargs):
        with self._encoder_inputs(input_ids, attention_mask, pixel_values, visual_features, visual_mask) as (x, m):
            return self.text.generate(inputs_embeds=x, attention_mask=m, **kwargs)

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
