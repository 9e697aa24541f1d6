"""The T5 tokenizer of a CogVideoX pipeline folder, read locally through sentencepiece.

Matches transformers' T5Tokenizer as CogVideoX's `_get_t5_prompt_embeds` calls it
(padding="max_length", max_length=226, truncation=True, add_special_tokens=True): the text is
split around special tokens (</s>, <unk>, <pad>, <extra_id_N>), each piece is encoded with the
sentencepiece model, then truncated to max_length - 1 tokens, </s> appended and <pad> (id 0)
filled in up to max_length. Sentinels: <extra_id_k> has id sp_size + extra_ids - 1 - k.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from mpqjax.errors import UserInputError
from mpqjax.jsonio import read_json_object

MAX_SEQUENCE_LENGTH = 226  # CogVideoX


class T5Tokenizer:
  """tok(texts) -> int32 [B, max_length]; tok.encode(text) -> list of ids without padding."""

  def __init__(self, spiece_path: str, extra_ids: int = 100):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor(model_file=spiece_path)
    self.extra_ids = int(extra_ids)
    n = self.sp.get_piece_size()
    self.special = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for name, want in self.special.items():
      if self.sp.piece_to_id(name) != want and self.sp.id_to_piece(want) != name:
        raise UserInputError(f"{spiece_path}: not a T5 sentencepiece model ({name} is not id "
                             f"{want})")
    self.special.update({f"<extra_id_{k}>": n + self.extra_ids - 1 - k
                         for k in range(self.extra_ids)})
    self.vocab_size = n + self.extra_ids
    self.pad_id, self.eos_id = 0, 1
    # longest first, so <extra_id_10> is not read as <extra_id_1> + "0>"
    names = sorted(self.special, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(re.escape(s) for s in names) + ")")

  @classmethod
  def from_folder(cls, folder: str) -> "T5Tokenizer":
    """A tokenizer/ folder as released with CogVideoX: spiece.model (+ tokenizer_config.json)."""
    spiece = os.path.join(folder, "spiece.model")
    if not os.path.isfile(spiece):
      have = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
      raise UserInputError(f"{folder}: no spiece.model (the T5 sentencepiece model); found "
                           f"{have or 'nothing'}")
    extra_ids = 100
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
      cfg = read_json_object(cfg_path)
      cls_name = cfg.get("tokenizer_class", "T5Tokenizer")
      if cls_name not in ("T5Tokenizer", "T5TokenizerFast"):
        raise UserInputError(f"{cfg_path}: tokenizer_class {cls_name!r} is not a T5 tokenizer")
      extra_ids = int(cfg.get("extra_ids", 100))
    return cls(spiece, extra_ids)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` followed by </s>, no truncation or padding."""
    ids: list[int] = []
    for piece in self._split.split(text):
      if not piece:
        continue
      if piece in self.special:
        ids.append(self.special[piece])
      else:
        ids.extend(self.sp.encode(piece))
    return ids + [self.eos_id]

  def __call__(self, texts: str | list[str],
               max_length: int = MAX_SEQUENCE_LENGTH) -> np.ndarray:
    """int32 [B, max_length]: truncated to max_length (keeping the final </s>), pad-filled."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), max_length), self.pad_id, np.int32)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise UserInputError(f"prompt {i} is {type(t).__name__}, not a string")
      ids = self.encode(t)
      if len(ids) > max_length:
        warnings.warn(f"prompt {i} has {len(ids)} tokens; truncated to {max_length} as "
                      "CogVideoX does")
        ids = ids[:max_length - 1] + [self.eos_id]
      out[i, :len(ids)] = ids
    return out
