"""Which ``transformers`` auto class loads a saved directory: the one whose mapping lists the config's
``architectures`` (written by ``save_pretrained``). Names are only looked up in transformers' own mappings,
never imported from the file."""

from __future__ import annotations

# (auto class, its mapping of model type -> class name), most specific first
_AUTOS = (
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
    ("AutoModelForSpeechSeq2Seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
    ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
)


def _names(value) -> set[str]:
    return {value} if isinstance(value, str) else {v for v in value if isinstance(v, str)}


def auto_class_for(config):
    """The auto class to build ``config`` with (``AutoModel`` when no mapping names its architecture)."""
    import transformers as tf
    from transformers.models.auto import modeling_auto as ma

    archs = {a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)}
    model_type = getattr(config, "model_type", None)
    for auto, mapping_name in _AUTOS:
        mapping = getattr(ma, mapping_name, {})
        if archs and archs & _names(mapping.get(model_type, ())):
            return getattr(tf, auto)
    if getattr(config, "is_encoder_decoder", False):
        for auto, mapping_name in _AUTOS[1:3]:
            if model_type in getattr(ma, mapping_name, {}):
                return getattr(tf, auto)
    return tf.AutoModel
