"""Batched answers of a VL model: inputs from prompts and images, generation, and the log-probability of what was
generated. The training loop's validation and ``predict``/``evaluate``/``serve`` all go through these functions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EOS = 1  # the word-level tokenizer's ``</s>`` (vlpet_fx.data.tokenizer)


@dataclass
class Generated:
    """One answer: its text, the sum of its tokens' log-probabilities (``logprob``, the ``</s>`` included) and
    the number of those tokens (``tokens``)."""

    text: str
    logprob: float
    tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.tokens if self.tokens else 0.0


def pixel_inputs(model, tok, prompts: list[str], images: list[list], device) -> dict:
    """Model inputs from prompts and, per prompt, a list of uint8 images (H, W) or (H, W, 3)."""
    from ..train.batching import pad_pixels, tokenize

    ids, mask = tokenize(tok, prompts, device)
    pix, vmask = pad_pixels(images, model.image_size, device)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pix, visual_mask=vmask)


def answer_mask(sequences: torch.Tensor, eos_id: int = EOS) -> torch.Tensor:
    """(B, L) generated ids, first column the decoder start → mask of the scored positions 1..L-1: every token up
    to and including the first ``</s>`` (everything when there is none)."""
    body = sequences[:, 1:]
    is_eos = (body == eos_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # how many </s> came strictly before each position
    return before == 0


@torch.no_grad()
def sequence_logprobs(model, inputs: dict, sequences: torch.Tensor, eos_id: int = EOS) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Teacher-forced log-probability of ``sequences`` (from ``generate``) under ``model``: (sum, count) per row."""
    if sequences.shape[1] < 2:
        z = torch.zeros(sequences.shape[0])
        return z, z.long()
    logits = model(**inputs, decoder_input_ids=sequences[:, :-1]).logits.float()
    logp = F.log_softmax(logits, dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    mask = answer_mask(sequences, eos_id)
    return (logp * mask).sum(dim=1).cpu(), mask.sum(dim=1).cpu()


@torch.no_grad()
def generate_answers(model, tok, inputs: dict, *, max_new_tokens: int = 16, num_beams: int = 1,
                     with_scores: bool = True) -> list[Generated]:
    """Greedy (``num_beams=1``) or beam-search answers for one batch of ``inputs``; ``with_scores=False`` skips
    the scoring forward (its figures are then 0)."""
    was_training = model.training
    model.eval()
    try:
        seqs = model.generate(**inputs, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False)
        texts = tok.batch_decode(seqs, skip_special_tokens=True)
        if not with_scores:
            return [Generated(t, 0.0, 0) for t in texts]
        total, count = sequence_logprobs(model, inputs, seqs, eos_id=tok.eos_token_id)
    finally:
        model.train(was_training)
    return [Generated(t, float(s), int(n)) for t, s, n in zip(texts, total, count)]
