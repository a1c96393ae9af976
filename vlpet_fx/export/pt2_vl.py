"""``pt2`` of a vision-and-language model (:class:`vlpet_fx.vl.VLModel`, what ``train`` writes): the programs take
the images next to the text.

    model.pt2     (input_ids, attention_mask, pixel_values, visual_mask, decoder_input_ids) -> logits
    encoder.pt2   (input_ids, attention_mask, pixel_values, visual_mask)
                  -> (encoder hidden states, encoder attention mask: text tokens then visual tokens)
    decoder.pt2   one generation step without a KV cache, as for text models:
                  (decoder_input_ids, encoder_hidden_states, encoder_attention_mask) -> logits of the last position

``pixel_values`` is (batch, images, 3, S, S) scaled to [-1, 1] (:func:`vlpet_fx.vl.model.to_pixels`), and
``visual_mask`` (batch, images) marks real images (1) and padded slots (0). Batch, text length, number of images
(1 to the model's ``max_images``, at most 64) and decoded length are dynamic.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from .pt2 import MAX_LEN, DecoderStep

MAX_IMAGES = 64


class VLScore(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, visual_mask, decoder_input_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                          visual_mask=visual_mask, decoder_input_ids=decoder_input_ids).logits


class VLEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pixel_values, visual_mask):
        return self.model.encode(input_ids, attention_mask, pixel_values=pixel_values, visual_mask=visual_mask)


def vl_example(model, batch: int = 2, src: int = 9, images: int = 2, tgt: int = 5):
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    vocab = model.text.get_input_embeddings().num_embeddings
    ids = torch.randint(3, vocab, (batch, src), generator=g).to(device)
    pix = torch.randn(batch, images, 3, model.image_size, model.image_size, generator=g).to(device)
    dec = torch.randint(3, vocab, (batch, tgt), generator=g).to(device)
    return ids, torch.ones_like(ids), pix, torch.ones(batch, images, dtype=torch.long, device=device), dec


def export_vl_programs(model) -> dict[str, torch.export.ExportedProgram]:
    ids, mask, pix, vmask, dec = vl_example(model)
    batch, src = Dim("batch", min=1, max=1024), Dim("src", min=2, max=MAX_LEN)
    images = min(MAX_IMAGES, getattr(model, "max_images", MAX_IMAGES))  # the image-order embedding's rows
    k, tgt = Dim("images", min=1, max=images), Dim("tgt", min=1, max=MAX_LEN)
    enc, enc_mask = VLEncoder(model)(ids, mask, pix, vmask)
    per_image = (enc.shape[1] - ids.shape[1]) // pix.shape[1]
    # the encoder's length: text tokens + visual tokens (a dimension of its own for the decoder step)
    enc_len = Dim("enc_len", min=2, max=MAX_LEN + per_image * images)
    img = {0: batch, 1: k}
    return {
        "model": torch.export.export(VLScore(model), (ids, mask, pix, vmask, dec), strict=False,
                                     dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: src}, img, img,
                                                     {0: batch, 1: tgt})),
        "encoder": torch.export.export(VLEncoder(model), (ids, mask, pix, vmask), strict=False,
                                       dynamic_shapes=({0: batch, 1: src}, {0: batch, 1: src}, img, img)),
        "decoder": torch.export.export(DecoderStep(model.text), (dec, enc, enc_mask), strict=False,
                                       dynamic_shapes=({0: batch, 1: tgt}, {0: batch, 1: enc_len},
                                                       {0: batch, 1: enc_len})),
    }
