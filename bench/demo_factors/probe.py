"""Can a linear probe read the MNIST digit from the tiny ViT's 16 per-patch tokens, side by side, averaged, or
from one patch? (docs/bench/demo-factors/README.md)  .venv/bin/python bench/demo_factors/probe.py"""
import numpy as np, torch
from sklearn.linear_model import LogisticRegression
from vlpet_fx.data.images import load_source
from vlpet_fx.vl import build_vl
from vlpet_fx.vl.model import to_pixels
torch.manual_seed(0)
iset = load_source("mnist")
m = build_vl("t5", "tiny", vocab_size=64, seed=0)
idx = np.random.default_rng(0).permutation(len(iset))[:3000]; ims, ys = iset.images[idx], np.asarray(iset.labels[idx])
with torch.no_grad():
    px = to_pixels(list(ims), m.image_size).unsqueeze(1)
    f = m.encode_images(px)  # (N, 16, 64)
print(f.shape, "per-patch token std across patches", f.std(1).mean().item(), "across images", f.std(0).mean().item())
X = {"concat": f.flatten(1).numpy(), "mean": f.mean(1).numpy(), "one_patch(5)": f[:, 5].numpy()}
for k, x in X.items():
    clf = LogisticRegression(max_iter=2000).fit(x[:2000], ys[:2000])
    print(k, x.shape[1], "acc", clf.score(x[2000:], ys[2000:]))
