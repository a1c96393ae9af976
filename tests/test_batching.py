"""The batching helpers shared by train, evaluation, predict/serve and the benchmarks, each against a batch built by
hand: prompt text, right padding of text, zero-filled and masked image slots, and the split of one features call."""

import numpy as np
import torch

from vlpet_fx.data.tasks import Example
from vlpet_fx.data.tokenizer import build_tokenizer
from vlpet_fx.train.batching import example_features, pad_pixels, pad_visual, task_prompt, tokenize


def test_task_prompt_prefixes_the_task_name():
    assert task_prompt("vqa", "what is it?") == "vqa: what is it?"


def test_tokenize_right_pads_to_the_longest_text():
    texts = ["vqa: one two three", "gqa: four"]
    tok = build_tokenizer(texts)
    ids, mask = tokenize(tok, texts, "cpu")
    alone = [tok(t)["input_ids"] for t in texts]
    assert ids.shape == mask.shape == (2, max(map(len, alone)))
    for row, m, a in zip(ids.tolist(), mask.tolist(), alone):
        assert row[: len(a)] == a and m == [1] * len(a) + [0] * (len(row) - len(a))
        assert all(i == tok.pad_token_id for i in row[len(a):])


def test_pad_visual_fills_missing_images_with_masked_zeros():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, generator=g), torch.randn(1, 3, 4, generator=g)  # 2 images and 1, 3 tokens each
    out, mask = pad_visual([a, b], "cpu")
    expected = torch.stack([torch.cat([a[0], a[1]]), torch.cat([b[0], torch.zeros(3, 4)])])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert mask.tolist() == [[1, 1], [1, 0]]


def test_pad_pixels_blank_slot_and_mask():
    ims = [[np.full((8, 8), 255, np.uint8), np.zeros((8, 8), np.uint8)], [np.full((8, 8), 255, np.uint8)]]
    pix, mask = pad_pixels(ims, 4, "cpu")
    assert pix.shape == (2, 2, 3, 4, 4) and mask.tolist() == [[1, 1], [1, 0]]
    assert torch.all(pix[0, 0] == 1) and torch.all(pix[0, 1] == -1)  # white → 1, black → -1
    assert torch.all(pix[1, 1] == 0)  # the missing image: a blank (zero) slot


class _CountingCache:
    """Features of image i: a (1, 2) row filled with the image's value; counts calls."""

    def __init__(self):
        self.calls = 0

    def features(self, images):
        self.calls += 1
        return torch.stack([torch.full((1, 2), float(im.flat[0])) for im in images])


def test_example_features_one_call_split_per_example():
    im = lambda v: np.full((2, 2), v, np.uint8)  # noqa: E731
    exs = [Example("nlvr", [im(1), im(2)], "x", "true"), Example("vqa", [], "y", "z"),
           Example("vqa", [im(3)], "w", "v")]
    cache = _CountingCache()
    out = example_features(cache, exs)
    assert cache.calls == 1
    assert [o.shape[0] for o in out] == [2, 0, 1]
    assert out[0][:, 0, 0].tolist() == [1.0, 2.0] and out[2][:, 0, 0].tolist() == [3.0]
