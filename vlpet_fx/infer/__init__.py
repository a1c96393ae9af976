"""Answers from a trained VL model: ``predict`` (prompts about images), ``evaluate`` (task metrics on held-out
data) and the :class:`Predictor` that ``vlpet-fx serve`` batches requests through."""

from .generate import Generated, generate_answers, sequence_logprobs
from .images import decode_image, read_image
from .loading import load_for_inference
from .predictor import Answer, Predictor, Query, evaluate, predict

__all__ = ["Answer", "Generated", "Predictor", "Query", "decode_image", "evaluate", "generate_answers",
           "load_for_inference", "predict", "read_image", "sequence_logprobs"]
