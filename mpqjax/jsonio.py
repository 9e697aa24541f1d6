"""Reading the small JSON files users hand us (configs, manifests, calibrations)."""
from __future__ import annotations

import json

from mpqjax.errors import UserInputError


def read_json_object(path: str) -> dict:
  """The JSON object in `path`. FileNotFoundError if it is missing; UserInputError naming the
  file if it is not valid UTF-8 JSON or not an object."""
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserInputError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise UserInputError(f"{path}: expected a JSON object, got {type(d).__name__}")
  return d
