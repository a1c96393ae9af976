"""The authors' visual embedding (feature + box + image order, norm by backbone) and the VL-BART encoder input,
each checked against a computation written out by hand from the authors' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vlpet_fx
from vlpet_fx.vl import build_vl
from vlpet_fx.vl.embedding import token_boxes
from vlpet_fx.vl.model import MAX_IMAGES


@pytest.fixture(scope="module")
def bart():
    return build_vl("bart", "tiny", vocab_size=64, seed=3)


@pytest.fixture(scope="module")
def t5():
    return build_vl("t5", "tiny", vocab_size=64, seed=3)


def _features(model, batch=2, images=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = model.tokens_per_image * model.group
    return torch.randn(batch, images * n, model.feature_dim, generator=g)


def _hand_boxes(images: int) -> torch.Tensor:
    """The tiny ViT's 4x4 patch grid, row-major, repeated per image: x1, y1, x2, y2, area."""
    one = [[c / 4, r / 4, (c + 1) / 4, (r + 1) / 4, 1 / 16] for r in range(4) for c in range(4)]
    return torch.tensor(one * images)


def _layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _rms_norm(x, w, eps):
    return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps) * w


def _hand_visual(model, feats, norm):
    """feature Linear + norm, box Linear + norm on (x1, y1, x2, y2, area), image-order embedding: summed."""
    ve = model.visual_projection
    images = feats.shape[1] // model.tokens_per_image
    fl, fn = ve.feat_embedding
    bl, bn = ve.absolute_vis_pos_embedding
    boxes = _hand_boxes(images)
    order = torch.arange(images).repeat_interleave(model.tokens_per_image)
    return (norm(feats @ fl.weight.T + fl.bias, fn) + norm(boxes @ bl.weight.T + bl.bias, bn)
            + ve.img_order_embedding.weight[order])


def test_bart_visual_embedding_is_feature_box_and_image_order_with_layernorm(bart):
    feats = _features(bart)
    want = _hand_visual(bart, feats, lambda x, n: _layer_norm(x, n.weight, n.bias, n.eps))
    with torch.no_grad():
        got = bart.visual_tokens(visual_features=feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_t5_visual_embedding_uses_the_rms_norm_of_its_text_model(t5):
    # T5's own norm: no mean subtraction, no bias (found by what the text model computes, not by its name)
    fn = t5.visual_projection.feat_embedding[1]
    assert [n for n, _ in fn.named_parameters()] == ["weight"] and torch.equal(fn.weight, torch.ones_like(fn.weight))
    feats = _features(t5) + 3.0  # a mean offset: LayerNorm would remove it, an RMS norm does not
    want = _hand_visual(t5, feats, lambda x, n: _rms_norm(x, n.weight, n.variance_epsilon))
    with torch.no_grad():
        got = t5.visual_tokens(visual_features=feats)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_new_layers_start_as_under_the_authors_transformers(bart, t5):
    # the authors' transformers 4.x: BART's _init_weights draws every Linear / Embedding N(0, init_std) with zero
    # biases; T5's has no branch for a bare Linear / Embedding, so they keep PyTorch's default (uniform within
    # +-1/sqrt(fan_in), N(0, 1) rows), not transformers 5's N(0, initializer_factor = 1) fallback
    std = bart.text.config.init_std
    bve = bart.visual_projection
    for lin in (bve.feat_embedding[0], bve.absolute_vis_pos_embedding[0]):
        assert torch.count_nonzero(lin.bias) == 0
    w = bve.feat_embedding[0].weight
    assert abs(w.std().item() - std) < 0.15 * std
    assert abs(bve.img_order_embedding.weight.std().item() - std) < 0.15 * std
    tve = t5.visual_projection
    for lin in (tve.feat_embedding[0], tve.absolute_vis_pos_embedding[0]):
        bound = 1 / math.sqrt(lin.in_features)
        assert lin.weight.abs().max() <= bound and lin.bias.abs().max() <= bound
        assert torch.count_nonzero(lin.bias) == lin.out_features
    w = tve.feat_embedding[0].weight  # uniform +-b: std b / sqrt(3)
    assert abs(w.std().item() - 1 / math.sqrt(3 * w.shape[1])) < 0.1 / math.sqrt(3 * w.shape[1])
    assert abs(tve.img_order_embedding.weight.std().item() - 1.0) < 0.1


def test_the_two_images_of_a_pair_are_told_apart(bart):
    feats = _features(bart, batch=1)
    n = bart.tokens_per_image
    swapped = torch.cat([feats[:, n:], feats[:, :n]], dim=1)
    with torch.no_grad():
        a, b = bart.visual_tokens(visual_features=feats), bart.visual_tokens(visual_features=swapped)
    order = bart.visual_projection.img_order_embedding.weight
    # the same feature at the same patch in image 0 vs image 1 differs exactly by the order embeddings
    torch.testing.assert_close(b[:, n:] - a[:, :n], (order[1] - order[0]).expand(n, -1).unsqueeze(0))


def test_boxes_of_pooled_grouped_and_declared_tokens():
    whole = token_boxes(3, None)
    assert whole.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]] * 3
    # 8 consecutive patches of a 4x4 grid side by side: the two half-image boxes
    assert token_boxes(16, (4, 4), group=8).tolist() == [[0.0, 0.0, 1.0, 0.5, 0.5], [0.0, 0.5, 1.0, 1.0, 0.5]]
    rn = build_vl("t5", "tiny", visual="clip-rn50", vocab_size=64)  # attention-pooled: one token per image
    assert rn.tokens_per_image == 1 and rn.token_boxes.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    grouped = build_vl("t5", "tiny", vocab_size=64, tokens_per_image=2)
    assert grouped.token_boxes.tolist() == [[0.0, 0.0, 1.0, 0.5, 0.5], [0.0, 0.5, 1.0, 1.0, 0.5]]


def test_a_wrong_token_grid_and_too_many_images_are_refused(t5):
    tower = build_vl("t5", "tiny", vocab_size=64).visual
    tower.token_grid = (3, 3)  # 16 tokens, not 9
    with pytest.raises(vlpet_fx.ModelSpecError, match="token_grid 3x3 but gives 16 tokens"):
        vlpet_fx.vl.VLModel(tower, t5.text, 64)
    few = vlpet_fx.vl.VLModel(build_vl("t5", "tiny", vocab_size=64).visual, t5.text, 64, max_images=2)
    with pytest.raises(vlpet_fx.ModelSpecError, match="3 images in one example, but this model tells at most 2"):
        few.visual_tokens(visual_features=_features(few, images=3))


def test_image_order_covers_every_image_a_data_row_or_query_may_hold():
    from vlpet_fx.data.jsonl import MAX_IMAGES_PER_ROW
    from vlpet_fx.infer.predictor import MAX_IMAGES as QUERY_IMAGES

    assert MAX_IMAGES == MAX_IMAGES_PER_ROW >= QUERY_IMAGES
    assert build_vl("t5", "tiny", vocab_size=64).max_images == MAX_IMAGES


def _first_layer_input(model, layer, **inputs):
    got = []
    h = layer.register_forward_pre_hook(lambda mod, args, kwargs: got.append(args[0] if args else kwargs["hidden_states"]),
                                        with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return got[0]


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, 5), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), visual_features=_features(model, seed=seed),
                decoder_input_ids=torch.randint(3, 64, (2, 3), generator=g))


def test_vl_bart_encoder_input_is_text_pipeline_then_visual_tokens(bart):
    """The authors' VL-BART: text = layernorm_embedding(embed_tokens·scale + positions); the visual tokens follow,
    with no positions and no embedding norm."""
    assert bart.join.mode == "after_pipeline" and bart.join.path == "layernorm_embedding"
    enc = bart.text.get_encoder()
    x = _inputs(bart)
    got = _first_layer_input(bart, enc.layers[0], **x)
    cfg = bart.text.config
    scale = math.sqrt(cfg.d_model) if cfg.scale_embedding else 1.0
    ids = x["input_ids"]
    tok = bart.text.get_input_embeddings().weight[ids] * scale
    pos = enc.embed_positions.weight[2 + torch.arange(ids.shape[1])]  # BART's learned positions start at 2
    ln = enc.layernorm_embedding
    text = _layer_norm(tok + pos, ln.weight, ln.bias, ln.eps)
    vis = _hand_visual(bart, x["visual_features"], lambda v, n: _layer_norm(v, n.weight, n.bias, n.eps))
    torch.testing.assert_close(got, torch.cat([text, vis], dim=1), rtol=1e-5, atol=1e-5)
    # and the encoder the decoder reads is the one `encode` gives (pt2's encoder program)
    with torch.no_grad():
        hidden, mask = bart.encode(x["input_ids"], x["attention_mask"], visual_features=x["visual_features"])
        old = enc(inputs_embeds=torch.cat([tok, vis], dim=1), attention_mask=mask)  # positions + norm on all
    assert hidden.shape == (2, 5 + 32, cfg.d_model) and not torch.allclose(hidden, old.last_hidden_state)


def test_vl_t5_encoder_input_is_token_embeddings_then_visual_tokens(t5):
    assert t5.join.mode == "inputs_embeds"
    x = _inputs(t5)
    got = _first_layer_input(t5, t5.text.get_encoder().block[0], **x)
    text = t5.text.get_input_embeddings().weight[x["input_ids"]]
    vis = _hand_visual(t5, x["visual_features"], lambda v, n: _rms_norm(v, n.weight, n.variance_epsilon))
    torch.testing.assert_close(got, torch.cat([text, vis], dim=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, mode", [("marian", "no_positions"), ("mbart", "after_pipeline")])
def test_visual_tokens_get_no_text_positions_in_other_families(family, mode):
    m = build_vl(family, "tiny", vocab_size=64)
    assert m.join.mode == mode
    x = _inputs(m)
    enc = m.text.get_encoder()
    got = _first_layer_input(m, enc.layers[0], **x)
    with torch.no_grad():
        vis = m.visual_tokens(visual_features=x["visual_features"])
    torch.testing.assert_close(got[:, 5:], vis)  # the visual tokens enter the layers untouched
    text_alone = _first_layer_input(enc, enc.layers[0], inputs_embeds=m.text.get_input_embeddings()(x["input_ids"]))
    torch.testing.assert_close(got[:, :5], text_alone)


def test_generate_and_training_go_through_the_join(bart):
    x = _inputs(bart)
    m = build_vl("bart", "tiny", vocab_size=64, seed=3)
    vlpet_fx.patch(m, "vlpet_large")
    ve = m.visual_projection
    assert all(p.requires_grad for p in ve.parameters())  # the rules' visual-projector selector takes all of it
    m.train()
    out = m(**x, labels=x["decoder_input_ids"])
    out.loss.backward()
    assert ve.img_order_embedding.weight.grad[:2].abs().sum() > 0 and ve.img_order_embedding.weight.grad[2:].abs().sum() == 0
    assert ve.absolute_vis_pos_embedding[0].weight.grad.abs().sum() > 0
    bart.eval()
    seq = bart.generate(x["input_ids"], x["attention_mask"], visual_features=x["visual_features"], max_new_tokens=3)
    assert seq.shape[0] == 2


def _text_forward(model, x, embeds, mask):
    return model.text(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=x["decoder_input_ids"],
                      use_cache=False).logits


def test_two_threads_share_a_model(bart):
    """The join's hook acts only in the thread whose forward installed it: each thread's forward, run while the
    other's hook is installed, gets its own visual tokens."""
    import threading

    xs = [_inputs(bart, seed=s) for s in (1, 2)]
    with torch.no_grad():
        want = [bart(**x).logits for x in xs]
    ready, go, other = threading.Event(), threading.Event(), []

    def second():
        x = xs[1]
        with torch.no_grad(), bart._encoder_inputs(x["input_ids"], x["attention_mask"], None, x["visual_features"],
                                                   None) as (embeds, mask):
            ready.set()
            go.wait(60)
            other.append(_text_forward(bart, x, embeds, mask))

    x = xs[0]
    with torch.no_grad(), bart._encoder_inputs(x["input_ids"], x["attention_mask"], None, x["visual_features"],
                                               None) as (embeds, mask):
        t = threading.Thread(target=second)
        t.start()
        ready.wait(60)  # the second thread's hook is installed after ours
        mine = _text_forward(bart, x, embeds, mask)
        go.set()
        t.join()
    torch.testing.assert_close(mine, want[0])
    torch.testing.assert_close(other[0], want[1])


class _OnePlusRMSNorm(torch.nn.Module):  # Gemma's convention: (1 + weight) · x / rms(x), weight starting at 0
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((d,), 0.7))
        self.eps = 1e-6

    def forward(self, x):
        return x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class _LayerScale(torch.nn.Module):  # a per-channel scale: has a (d,) weight but does not normalise
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.weight


def test_the_norm_is_found_by_what_it_computes():
    from vlpet_fx.vl.embedding import norm_like

    d = 8
    got = norm_like(torch.nn.Sequential(_LayerScale(d), _OnePlusRMSNorm(d)), d)
    assert isinstance(got, _OnePlusRMSNorm) and torch.equal(got.weight, torch.zeros(d))  # unit gain: 1 + 0
    x = torch.randn(3, d)
    torch.testing.assert_close(got(x).pow(2).mean(-1), torch.ones(3), atol=1e-4, rtol=0)
    assert type(norm_like(torch.nn.Sequential(_LayerScale(d)), d)) is torch.nn.LayerNorm  # none: LayerNorm
