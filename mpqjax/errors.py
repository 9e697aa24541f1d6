"""Errors that mean "the user's input is wrong": the CLI prints them and exits with code 2."""


class UserInputError(ValueError):
  """Bad shapes, dtypes, configs, files or flags. The message names the culprit."""
