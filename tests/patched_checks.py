"""What every patched Hugging Face model of the family tests must do after its forward: train and generate."""

from __future__ import annotations

import torch


def assert_trains_and_generates(patched, out: torch.Tensor, kwargs: dict, name: str, *, generate: bool = True):
    """A backward from the patched model's output ``out`` reaches every trainable parameter with a finite
    gradient; with ``generate``, greedy generation with the cache gives the tokens it gives without it (the PET
    modules see the same values one token at a time as on the whole sequence)."""
    out.float().sum().backward()
    trainable = [p for p in patched.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable), name
    if not generate:
        return
    extra = {k: v for k, v in kwargs.items() if k != "use_cache"}
    with torch.no_grad():
        cached = patched.generate(**extra, max_new_tokens=3, do_sample=False, use_cache=True)
        plain = patched.generate(**extra, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain), name


def perturb(model, scale: float = 0.3) -> None:
    """Move every trainable (PET) parameter off its initial value, deterministically (LoRA's B, an adapter's up
    and a zero-initialised gate start at zero, so a patched model would equal the base one)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))


def pets(model) -> dict:
    """The PET modules of a patched model by site key, for either back end (eager: attached to the model;
    graph: one ``vlpet_<i>`` child per placement)."""
    if isinstance(model, torch.fx.GraphModule):
        return {model.vlpet_plan.placements[int(n.split("_")[1])].site.key: c.pet
                for n, c in model.named_children() if n.startswith("vlpet_")}
    return {p.site.key: model.get_submodule(path) for path, p in model.vlpet_patch.attached.items()}


def same_pets_as(graph, eager) -> None:
    """Give the graph back end's PET modules the eager ones' weights (site by site)."""
    mods = pets(eager)
    assert sorted(pets(graph)) == sorted(mods)
    for k, mod in pets(graph).items():
        mod.load_state_dict(mods[k].state_dict())


def same_grads(graph, eager) -> None:
    """After a backward through each: every PET parameter has the same gradient in both back ends."""
    mods = pets(eager)
    assert sorted(pets(graph)) == sorted(mods)
    for k, mod in pets(graph).items():
        for (n, p), (_, q) in zip(mod.named_parameters(), mods[k].named_parameters()):
            assert p.grad is not None and torch.allclose(p.grad, q.grad, atol=1e-5), (k, n)


def graph_agrees(model, rules, eager, got: torch.Tensor, args: tuple) -> None:
    """The graph back end, patched from ``rules`` (a rule set or plan) with the eager PET modules' weights,
    computes ``got`` (the eager output on ``args``) and, after a backward through each, the same gradients."""
    import copy

    import vlpet_fx

    graph = vlpet_fx.patch(copy.deepcopy(model), rules, backend="graph", example_inputs=args)
    same_pets_as(graph, eager)
    out = graph(*args)
    assert torch.allclose(out, got, atol=1e-6)
    got.square().sum().backward()
    out.square().sum().backward()
    same_grads(graph, eager)
