"""The authors' visual embedding (VL-Adapter / VL-PET ``VisualEmbedding``) and where its tokens join the encoder.

Each visual token is the sum of three trainable terms:

* ``feat_embedding``: the image encoder's feature through Linear(F→d) and a norm;
* ``absolute_vis_pos_embedding``: the token's box (x1, y1, x2, y2, area), normalised to [0, 1], through
  Linear(5→d) and a norm — a patch token carries its patch's box, a pooled token the whole image's (0, 0, 1, 1, 1);
* ``img_order_embedding``: which image of the example the token comes from (an NLVR pair: 0 and 1).

The norm is a fresh copy of the text model's own normalisation (found by what it computes, not by its class
name): T5's RMS-style norm for T5, ``LayerNorm`` for BART, as the authors use per backbone. New layers are
initialised as the authors' code got them (:func:`init_like`: BART's N(0, ``init_std``), T5's PyTorch default;
the authors' encoder calls ``init_weights()`` after building its visual embedding). The authors also add a frozen
row of the text vocabulary per token position (``<vis_extra_id_k>``), their only per-token position when their
CLIP boxes are all zero; here every patch token carries its own box, and no vocabulary row is reserved.

:class:`EncoderJoin` finds where the text encoder's embedding pipeline ends (what it computes before its first
layer: BART's token embeddings × scale + positions → ``layernorm_embedding``; T5's token embeddings) so that the
visual tokens join *after* it, as in the authors' VL-BART, and get no text positions and no embedding norm.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from typing import Iterator

import torch
from torch import nn

from ..errors import ModelSpecError

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


class VisualEmbedding(nn.Module):
    """``forward(feats (B, N, F), boxes (N, 5) or (B, N, 5), image_ids (N,) or (B, N)) -> (B, N, d)``."""

    def __init__(self, feature_dim: int, d_model: int, norm: nn.Module, max_images: int):
        super().__init__()
        self.feat_embedding = nn.Sequential(nn.Linear(feature_dim, d_model), norm)
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(5, d_model), copy.deepcopy(norm))
        self.img_order_embedding = nn.Embedding(max_images, d_model)

    @property
    def max_images(self) -> int:
        return self.img_order_embedding.num_embeddings

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
        return (self.feat_embedding(feats) + self.absolute_vis_pos_embedding(boxes.to(feats.dtype))
                + self.img_order_embedding(image_ids))


def with_area(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) boxes x1, y1, x2, y2 → (…, 5) with the area (x2 − x1)·(y2 − y1) appended."""
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return torch.cat([boxes, area.unsqueeze(-1)], dim=-1)


def token_boxes(n_tokens: int, grid: tuple[int, int] | None, group: int = 1) -> torch.Tensor:
    """The boxes (x1, y1, x2, y2, area) of one image's ``n_tokens // group`` visual tokens.

    ``grid`` (rows, cols): the encoder's tokens are its patches in row-major order; ``None``: the tokens are
    pooled (each sees the whole image). ``group`` consecutive tokens side by side (``tokens_per_image``) get the
    box that bounds their patches."""
    if grid is None:
        boxes = torch.tensor([WHOLE_IMAGE] * n_tokens, dtype=torch.float32)
    else:
        rows, cols = grid
        i = torch.arange(n_tokens)
        r, c = (i // cols).float(), (i % cols).float()
        boxes = torch.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], dim=1)
    boxes = boxes.reshape(n_tokens // group, group, 4)
    merged = torch.cat([boxes[..., :2].amin(dim=1), boxes[..., 2:].amax(dim=1)], dim=1)
    return with_area(merged)


def token_grid_of(visual: nn.Module, n_tokens: int) -> tuple[int, int] | None:
    """Where the encoder's tokens sit: its ``token_grid`` (rows, cols) when it declares one, else pooled."""
    grid = getattr(visual, "token_grid", None)
    if grid is None:
        return None
    try:
        rows, cols = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ModelSpecError(f"the image encoder's token_grid {grid!r} is not (rows, cols)") from None
    if rows < 1 or cols < 1 or rows * cols != n_tokens:
        raise ModelSpecError(f"the image encoder declares token_grid {rows}x{cols} but gives {n_tokens} tokens per "
                             "image: fix its token_grid (or remove it for pooled tokens)")
    return rows, cols


# ---- the text model's own norm ------------------------------------------------------------------------------


def _affine_params(m: nn.Module, d: int) -> bool:
    params = dict(m.named_parameters(recurse=False))
    return (not any(True for _ in m.children()) and "weight" in params and set(params) <= {"weight", "bias"}
            and all(tuple(p.shape) == (d,) for p in params.values()))


def _probe_copy(m: nn.Module) -> nn.Module:
    probe = copy.deepcopy(m)
    if any(p.is_meta for p in probe.parameters()):
        probe = probe.to_empty(device="cpu")
    return probe.float().cpu()


def _set_unit_gain(norm: nn.Module, d: int) -> bool:
    """Set the norm's gain so its output has unit RMS (weight 1, or 0 for a norm computing (1 + weight)·x̂) and
    its bias to 0; False if the module does not normalise (its output changes when its input is scaled)."""
    x = torch.randn(2, 3, d, generator=torch.Generator().manual_seed(0), device="cpu")
    for gain in (1.0, 0.0):
        with torch.no_grad():
            for name, p in norm.named_parameters(recurse=False):
                p.fill_(gain if name == "weight" else 0.0)
            try:
                y, y5 = norm(x), norm(5 * x)
            except Exception:  # not a module of one tensor argument
                return False
        if not (isinstance(y, torch.Tensor) and y.shape == x.shape and torch.isfinite(y).all()):
            return False
        if not torch.allclose(y, y5, atol=1e-3):
            return False
        if torch.allclose(y.pow(2).mean(-1).sqrt(), torch.ones(2, 3, device="cpu"), atol=1e-2):
            return True
    return False


def norm_like(text: nn.Module, d: int) -> nn.Module:
    """A fresh normalisation layer of the kind the text model's encoder uses (its own class and epsilon; gain
    at unit, bias at zero); ``LayerNorm(d)`` when the encoder has none."""
    encoder = text.get_encoder() if hasattr(text, "get_encoder") else text
    for m in encoder.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)) or not _affine_params(m, d):
            continue
        fresh = _probe_copy(m)
        if not _set_unit_gain(fresh, d):  # leaves the gain that gives unit RMS
            continue
        weight = next(m.parameters())
        if weight.is_meta:
            return copy.deepcopy(m)  # shapes only (the budget on the meta device)
        fresh = fresh.to(device=weight.device, dtype=torch.get_default_dtype())
        for p in fresh.parameters():
            p.requires_grad_(True)
            if hasattr(p, "_is_hf_initialized"):
                del p._is_hf_initialized
        return fresh
    return nn.LayerNorm(d)


# the config fields a Hugging Face family names its weights' init standard deviation by
_INIT_STD_FIELDS = ("initializer_range", "init_std")


def _names_init_std(config) -> bool:
    """Whether the text model's config (or one of its sub-configs: an encoder-decoder's halves) names a standard
    deviation for new weights."""
    configs = [config] + [getattr(config, k, None) for k in ("encoder", "decoder", "text_config")]
    return any(isinstance(getattr(c, f, None), (int, float)) for c in configs if c is not None
               for f in _INIT_STD_FIELDS)


def init_like(text: nn.Module, module: nn.Module) -> None:
    """Initialise ``module``'s Linear and Embedding layers as the authors' code got them.

    The authors' encoder calls ``init_weights()`` after building its visual embedding, under transformers 4.x,
    where a layer is initialised only by the family's own ``_init_weights`` branches: BART draws every Linear
    and Embedding N(0, ``init_std``), zero biases; T5's has no branch for a bare Linear or Embedding, so they keep
    PyTorch's default (uniform ±1/√fan_in, N(0, 1) rows). Transformers 5 added a generic fallback that draws
    N(0, std) with std the config's ``initializer_range`` / ``init_std``, or, for a config naming only a scale
    ``initializer_factor`` (T5), that factor itself: N(0, 1) weights, √fan_in times PyTorch's scale, which a
    norm right after hides at the start but which makes Adam's steps that many times smaller relative to the
    weights (the layer learns that much slower). So the text model's ``_init_weights`` is used when its config
    names a standard deviation, PyTorch's default otherwise."""
    init = getattr(text, "_init_weights", None)
    config = getattr(text, "config", None)
    use_model = init is not None and config is not None and _names_init_std(config)
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            if use_model:
                init(m)
            else:
                m.reset_parameters()


# ---- where the visual tokens join the encoder ---------------------------------------------------------------


class _Stop(Exception):
    pass


def _first_layer_input(args, kwargs):
    return args[0] if args else kwargs.get("hidden_states")


class EncoderJoin:
    """Where visual tokens enter the text encoder.

    The encoder is called with ``inputs_embeds = [text embeddings ; zeros]``. The *embedding pipeline* is what
    the encoder runs before its first layer (the first element of a layer list it calls); the visual tokens
    replace the zeros in the output of the pipeline's last module that is not a dropout (``after_pipeline``;
    BART: ``layernorm_embedding``), so the text tokens get the pipeline and the visual tokens join after it (the
    dropout that follows applies to both, as in the authors' code). When that module's output is added last
    (Marian/Pegasus: positions), the visual tokens go in through ``inputs_embeds`` and that module gives them
    zeros (``no_positions``). With no such module (T5) they go in directly through ``inputs_embeds``. The
    choice is checked once on the model: the first layer's input must be exactly [the pipeline of the text alone
    ; the visual tokens]; if neither hook gives that, the visual tokens go in through ``inputs_embeds``
    (``mode`` says which)."""

    def __init__(self, text: nn.Module, d: int):
        self.path: str | None = None
        self.mode = "inputs_embeds"
        encoder = text.get_encoder() if hasattr(text, "get_encoder") else None
        if encoder is None:
            return
        try:
            order, first = self._call_order(encoder, d)
        except Exception:  # the encoder does not run on a probe: keep the plain join
            return
        last = next((n for n in reversed(order) if not isinstance(encoder.get_submodule(n), nn.Dropout)), None)
        if first is None or last is None:
            return
        self.path = last
        if any(p.is_meta for p in encoder.parameters()):
            self.mode = "after_pipeline"  # shapes only: cannot be checked on the meta device
            return
        for mode in ("after_pipeline", "no_positions"):
            self.mode = mode
            if self._checks(encoder, d, first):
                return
        self.path, self.mode = None, "inputs_embeds"

    @staticmethod
    def _layer_lists(encoder: nn.Module) -> set[int]:
        return {id(m) for lst in encoder.modules() if isinstance(lst, nn.ModuleList) for m in lst}

    def _call_order(self, encoder: nn.Module, d: int) -> tuple[list[str], str | None]:
        """The leaf modules that finished before the first layer started, in order, and that layer's path."""
        names = {id(m): n for n, m in encoder.named_modules() if n}
        layers = self._layer_lists(encoder)
        done: list[str] = []
        first: list[str] = []

        def pre(mod, args, kwargs):
            if id(mod) in layers and not first:
                first.append(names[id(mod)])
                raise _Stop

        def post(mod, args, out):
            if not first and id(mod) in names and not any(True for _ in mod.children()):
                done.append(names[id(mod)])

        handles = []
        for m in encoder.modules():
            if id(m) in names:
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(m.register_forward_hook(post))
        p = next(encoder.parameters())
        x = torch.zeros(1, 3, d, device=p.device, dtype=p.dtype)
        was = encoder.training
        encoder.eval()
        try:
            with torch.no_grad():
                encoder(inputs_embeds=x)
        except _Stop:
            pass
        finally:
            encoder.train(was)
            for h in handles:
                h.remove()
        return done, (first[0] if first else None)

    def _layer_input(self, encoder: nn.Module, first: str, embeds: torch.Tensor, visual=None) -> torch.Tensor:
        got: list[torch.Tensor] = []

        def grab(mod, args, kwargs):
            got.append(_first_layer_input(args, kwargs))
            raise _Stop

        h = encoder.get_submodule(first).register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad(), (self.joined(encoder, visual) if visual is not None else contextlib.nullcontext()):
                mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
                encoder(inputs_embeds=embeds, attention_mask=mask)
        except _Stop:
            pass
        finally:
            h.remove()
        return got[0]

    def _checks(self, encoder: nn.Module, d: int, first: str) -> bool:
        p = next(encoder.parameters())
        g = torch.Generator().manual_seed(0)
        text = torch.randn(1, 4, d, generator=g, device="cpu").to(p.device, p.dtype)
        vis = torch.randn(1, 3, d, generator=g, device="cpu").to(p.device, p.dtype)
        was = encoder.training
        encoder.eval()
        try:
            alone = self._layer_input(encoder, first, text)
            tail = torch.zeros_like(vis) if self.mode == "after_pipeline" else vis
            joined = self._layer_input(encoder, first, torch.cat([text, tail], dim=1), vis)
        except Exception:
            return False
        finally:
            encoder.train(was)
        if joined is None or alone is None or joined.shape != (1, 7, d):
            return False
        return bool(torch.allclose(joined[:, :4], alone, atol=1e-5) and torch.equal(joined[:, 4:], vis))

    @contextlib.contextmanager
    def joined(self, encoder: nn.Module, visual: torch.Tensor) -> Iterator[None]:
        """While active, the module at :attr:`path` gives ``visual`` (B, V, d) at the last V positions
        (``after_pipeline``; the encoder's ``inputs_embeds`` end with zeros there) or zeros there
        (``no_positions``: an additive last step, e.g. sinusoidal positions; the ``inputs_embeds`` end with the
        visual tokens); a no-op in ``inputs_embeds`` mode."""
        if self.path is None:
            yield
            return
        n = visual.shape[1]
        owner = threading.get_ident()

        def swap(mod, args, out):
            if threading.get_ident() != owner:  # another thread's forward of the same model: not this join
                return None
            if not isinstance(out, torch.Tensor) or out.dim() not in (2, 3) or out.shape[-2] < n:
                raise ModelSpecError(f"the text encoder's '{self.path}' gave {type(out).__name__} "
                                     f"{tuple(getattr(out, 'shape', ()))}, not the (batch, tokens, d) the visual "
                                     "tokens join")
            head = out[..., : out.shape[-2] - n, :]
            if self.mode == "no_positions":
                return torch.cat([head, out.new_zeros(*out.shape[:-2], n, out.shape[-1])], dim=-2)
            if out.dim() != 3:
                raise ModelSpecError(f"the text encoder's '{self.path}' gave a {out.dim()}-d tensor: the visual "
                                     "tokens join a (batch, tokens, d) one")
            return torch.cat([head, visual.to(out.dtype)], dim=1)

        h = encoder.get_submodule(self.path).register_forward_hook(swap)
        try:
            yield
        finally:
            h.remove()
