"""Training recipes: the optimisation settings a run uses when its options leave them open.

Two recipes:

* ``quick`` (the default): the settings this project's quick runs were tuned with — one learning rate 1e-3 for
  every backbone, weight decay 0.01 on every parameter with more than one dimension, the text model's own dropout
  rates, greedy decoding at evaluation.
* ``paper``: the VL-PET authors' (``src/trainer_base.py`` and the scripts of HenryHZY/VL-PET): lr 1e-3 for BART,
  3e-4 for T5, and 1e-4 for full fine-tuning (``scripts/image-text/full_finetuning.sh``, both backbones: a run
  whose text model trains every parameter); AdamW (eps 1e-6, weight decay 0.01) with no decay only for parameters
  whose name contains "bias" or "LayerNorm.weight" (so T5's ``layer_norm.weight`` and VL-PET-middleY's gate ``g``
  *are* decayed); warm-up ratio 0.1;
  gradient clipping at 5; dropout 0.1 in the text model (BART: dropout, attention_dropout, activation_dropout; T5:
  dropout_rate); beam search with 5 beams at evaluation.

Both share warm-up 0.1, clipping 5, eps 1e-6 and weight decay 0.01. The decay grouping defaults to the paper's for
the rule sets that reproduce the paper (:data:`PAPER_RULE_SETS`) under either recipe. An option given explicitly
always wins; :func:`resolve` returns every resolved value with where it came from, and ``run.json`` records it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

RECIPES = ("quick", "paper")
GROUPINGS = ("paper", "ndim")
# the paper's learning rate per text backbone (Hugging Face ``config.model_type``)
PAPER_LR = {"bart": 1e-3, "t5": 3e-4}
QUICK_LR = 1e-3
FALLBACK_LR = 1e-3  # the paper recipe on a backbone the paper did not train: BART's figure
# the authors' full fine-tuning (scripts/image-text/full_finetuning.sh: lr=1e-4 for BART and T5). At the PET
# methods' 1e-3, a post-LN text model trained in full collapses: every encoder position gives the same vector
PAPER_FULL_LR = 1e-4
# the shipped rule sets that configure the paper's methods (VL-PET's four granularities on BART and T5, and the
# VL-Adapter baseline the authors train with the same trainer)
PAPER_RULE_SETS = frozenset({
    "vlpet_large", "vlpet_middlex", "vlpet_middley", "vlpet_small",
    "vlpet_large_t5", "vlpet_middlex_t5", "vlpet_middley_t5", "vlpet_small_t5", "vl_adapter",
})
PAPER_NO_DECAY = ("bias", "LayerNorm.weight")
COMMON = {"weight_decay": 0.01, "warmup": 0.1, "grad_clip": 5.0, "adam_eps": 1e-6}
DROPOUT_FIELDS = ("dropout", "attention_dropout", "activation_dropout", "dropout_rate")  # HF config names


def decayed(name: str, param: torch.Tensor, grouping: str) -> bool:
    """Whether ``param`` (named ``name`` in the model) gets weight decay under ``grouping``."""
    if grouping == "paper":
        return not any(key in name for key in PAPER_NO_DECAY)
    if grouping == "ndim":
        return param.dim() > 1
    raise ValueError(f"unknown decay grouping {grouping!r}")


def param_groups(model: nn.Module, grouping: str, weight_decay: float) -> tuple[list[dict], dict]:
    """AdamW parameter groups of ``model``'s trainable parameters (decayed, undecayed: a partition) and a summary
    of the split (tensor and element counts, and the undecayed names — at most 200 of them)."""
    decay, no_decay, names = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if decayed(name, p, grouping):
            decay.append(p)
        else:
            no_decay.append(p)
            names.append(name)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    summary = {"decayed_tensors": len(decay), "decayed_elements": sum(p.numel() for p in decay),
               "undecayed_tensors": len(no_decay), "undecayed_elements": sum(p.numel() for p in no_decay),
               "undecayed_names": names[:200]}
    return groups, summary


def set_dropout(text_model: nn.Module, p: float) -> dict[str, float]:
    """Every dropout rate of a text model to ``p``: its config's rates (those of :data:`DROPOUT_FIELDS` it has,
    so a saved model records them), the ``nn.Dropout`` modules and the float rates layers pass to ``F.dropout``
    (an attention module's ``dropout``, a layer's ``activation_dropout``). Returns the config fields set."""
    cfg = getattr(text_model, "config", None)
    fields = {}
    for key in DROPOUT_FIELDS:
        if isinstance(getattr(cfg, key, None), (int, float)) and not isinstance(getattr(cfg, key), bool):
            setattr(cfg, key, p)
            fields[key] = p
    for m in text_model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        for attr in ("dropout", "attention_dropout", "activation_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)
    return fields


@dataclass
class Resolved:
    """The settings a run trains and evaluates with, and where each came from (``option``: given explicitly;
    ``recipe``: the recipe's; ``rules``: the decay grouping of the paper's rule sets; ``model``: the text model's
    own dropout rates)."""

    recipe: str
    backbone: str
    lr: float
    weight_decay: float
    decay_grouping: str
    warmup: float
    grad_clip: float
    adam_eps: float
    dropout: float | None
    dropout_fields: dict
    num_beams: int
    sources: dict
    param_groups: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def backbone_type(text_model: nn.Module) -> str:
    cfg = getattr(text_model, "config", None)
    kind = getattr(cfg, "model_type", None)
    return kind if isinstance(kind, str) and kind else type(text_model).__name__


def recipe_lr(recipe: str, backbone: str, full: bool) -> tuple[float, str]:
    """The learning rate ``recipe`` gives a text model of ``backbone`` (its ``config.model_type``), trained in full
    (``full``: every parameter of the text model trains) or not, and where the figure comes from."""
    if recipe != "paper":
        return QUICK_LR, "recipe"
    if full:
        return PAPER_FULL_LR, "recipe (full fine-tuning: the authors' full_finetuning.sh)"
    if backbone in PAPER_LR:
        return PAPER_LR[backbone], "recipe"
    return FALLBACK_LR, f"recipe (no paper figure for {backbone}: BART's)"


def trains_in_full(text_model: nn.Module) -> bool:
    """Whether every parameter of ``text_model`` trains (full fine-tuning, whatever the rule set is called)."""
    return all(p.requires_grad for p in text_model.parameters())


def resolve(cfg, backbone: str, full: bool = False) -> Resolved:
    """The recipe of ``cfg`` (a :class:`~vlpet_fx.train.config.TrainConfig`) for a text model of ``backbone``
    (its ``config.model_type``), trained in full or not (``full``, see :func:`trains_in_full`), explicit options
    first."""
    paper = cfg.recipe == "paper"
    sources: dict[str, str] = {}

    def pick(name: str, recipe_value, recipe_source: str = "recipe"):
        given = getattr(cfg, name)
        if given is not None:
            sources[name] = "option"
            return given
        sources[name] = recipe_source
        return recipe_value

    lr = pick("lr", *recipe_lr(cfg.recipe, backbone, full))
    if paper:
        grouping = pick("decay_grouping", "paper")
    elif cfg.rules in PAPER_RULE_SETS:
        grouping = pick("decay_grouping", "paper", "rules")
    else:
        grouping = pick("decay_grouping", "ndim")
    dropout = pick("dropout", 0.1 if paper else None, "recipe" if paper else "model")
    return Resolved(
        recipe=cfg.recipe, backbone=backbone, lr=float(lr),
        weight_decay=float(pick("weight_decay", COMMON["weight_decay"])), decay_grouping=grouping,
        warmup=float(pick("warmup", COMMON["warmup"])), grad_clip=float(pick("grad_clip", COMMON["grad_clip"])),
        adam_eps=float(pick("adam_eps", COMMON["adam_eps"])), dropout=dropout, dropout_fields={},
        num_beams=int(pick("num_beams", 5 if paper else 1)), sources=sources)
