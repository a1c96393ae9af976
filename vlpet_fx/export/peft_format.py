"""``peft``: a LoRA rule set as a PEFT adapter (adapter_config.json + adapter_model.safetensors).

PEFT writes the files itself: the PET modules are taken off the model, PEFT's LoRA layers are put on the same
modules with the same rank, alpha and dropout, our trained A/B matrices are copied in, and
``PeftModel.save_pretrained`` writes the adapter. ``peft.PeftModel.from_pretrained(base, dir)`` loads it.
Other trainable parameters must be exactly the model's biases (PEFT's ``bias="all"``) or none.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import ExportError
from .atomic import atomic_dir
from .merged import detach_pets
from .patched_dir import patch_state


def _check(model: nn.Module) -> str:
    plan = patch_state(model).plan
    others = sorted({p.method for p in plan.placements if p.method != "lora"})
    if others:
        raise ExportError(f"--format peft exports LoRA only; this rule set also places {', '.join(others)}: "
                          "use --format adapters")
    if not plan.placements:
        raise ExportError("--format peft needs at least one LoRA placement")
    sliced = [p for p in plan.placements if p.site.out_slice]
    if sliced:
        raise ExportError(f"PEFT's LoRA changes a whole module, but {sliced[0].site.key} is a slice of the packed "
                          f"{sliced[0].site.path}: use --format adapters or merged")
    extra = set(plan.trainable)
    if not extra:
        return "none"
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias") or n == "bias"}
    lora_biases = {f"{p.site.path}.bias" for p in plan.placements} & biases
    if extra == biases or extra | lora_biases == biases:
        return "all"
    odd = sorted(extra - biases)
    raise ExportError(f"PEFT cannot express the trainable parameter '{odd[0] if odd else sorted(extra)[0]}' of this "
                      "rule set (only all biases or none): use --format adapters")


def _is_hf_seq2seq(model: nn.Module) -> bool:
    """A Hugging Face encoder-decoder itself (PEFT's seq2seq wrapper needs its generation methods); a model that
    contains one (a VL model) gets PEFT's plain wrapper."""
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel) and getattr(model.config, "is_encoder_decoder", False)


def write_peft(model: nn.Module, manifest: dict, out: str | Path) -> None:
    try:
        import peft
    except ImportError:
        raise ExportError("--format peft needs the peft package: pip install peft") from None
    bias = _check(model)
    placements = patch_state(model).plan.placements
    ranks = {p.site.path: p.config.rank for p in placements}
    alphas = {p.site.path: p.config.alpha for p in placements}
    dropouts = {p.config.dropout for p in placements}
    if len(dropouts) > 1:
        raise ExportError("PEFT has one LoRA dropout per adapter; this rule set uses several")
    rank, alpha = next(iter(ranks.values())), next(iter(alphas.values()))
    cfg = peft.LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropouts.pop(), bias=bias, target_modules=sorted(ranks),
        rank_pattern={f"^{k}$": v for k, v in ranks.items() if v != rank},
        alpha_pattern={f"^{k}$": v for k, v in alphas.items() if v != alpha},
        task_type="SEQ_2_SEQ_LM" if _is_hf_seq2seq(model) else None,
    )
    pets = detach_pets(model)
    peft_model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for p, pet in pets:
            layer = peft_model.base_model.model.get_submodule(p.site.path)
            layer.lora_A["default"].weight.copy_(pet.lora_A.weight)
            layer.lora_B["default"].weight.copy_(pet.lora_B.weight)
    with atomic_dir(out) as tmp:
        peft_model.save_pretrained(str(tmp))
