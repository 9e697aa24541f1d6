"""T5 v1.1 encoder (transformers' T5EncoderModel) and its sentencepiece tokenizer, in JAX."""
from models.t5.model import T5Config, encode, param_shapes, relative_position_buckets
from models.t5.tokenizer import MAX_SEQUENCE_LENGTH, T5Tokenizer

__all__ = ["T5Config", "encode", "param_shapes", "relative_position_buckets",
           "MAX_SEQUENCE_LENGTH", "T5Tokenizer"]
