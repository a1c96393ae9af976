"""The demo-factor runs' driver (docs/bench/demo-factors/README.md): `vlpet-fx` with one factor of the visual
embedding varied by an environment variable.

VIS_INIT  code (the installed package's init_like) | v5 (the text model's _init_weights on every new layer: the code
          before the init fix, transformers 5's N(0, 1) for T5) | torch (PyTorch's default for every new layer)
VIS_TERMS all | feat (feature term only: no box, no image order) | feat+box | feat+order
VIS_NORM  model (the text model's norm) | layernorm
Usage: bench/demo_factors/run.sh NAME [train options] (run.sh gives the Makefile's backbone line)."""
import os, sys
import torch
from torch import nn
import vlpet_fx.vl.model as M
import vlpet_fx.vl.embedding as E

INIT = os.environ.get("VIS_INIT", "code")
TERMS = os.environ.get("VIS_TERMS", "all")
NORM = os.environ.get("VIS_NORM", "model")

if INIT == "torch":
    def init_like(text, module):
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.reset_parameters()
    M.init_like = init_like
elif INIT == "v5":  # the text model's _init_weights on every new layer (the code before the init fix)
    def init_like(text, module):
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                text._init_weights(m)
    M.init_like = init_like
if NORM == "layernorm":
    M.norm_like = lambda text, d: nn.LayerNorm(d)
if TERMS != "all":
    def fwd(self, feats, boxes, image_ids):
        out = self.feat_embedding(feats)
        if "box" in TERMS:
            out = out + self.absolute_vis_pos_embedding(boxes.to(feats.dtype))
        if "order" in TERMS:
            out = out + self.img_order_embedding(image_ids)
        return out
    E.VisualEmbedding.forward = fwd
print(f"[exp] VIS_INIT={INIT} VIS_TERMS={TERMS} VIS_NORM={NORM} threads={torch.get_num_threads()}", flush=True)
from vlpet_fx.cli.main import main
sys.argv = ["vlpet-fx"] + sys.argv[1:]
sys.exit(main())
