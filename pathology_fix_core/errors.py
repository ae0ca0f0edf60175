"""The exceptions argument checks raise: they name the rejected parameters.

A caller that reports bad configuration (the CLI) finds the user's settings
of `parameters` (gin bindings) from these fields instead of parsing messages.
Both are ValueErrors; `InvalidArgumentType` is also a TypeError.
"""


class InvalidArgument(ValueError):
  """An argument value a function or class rejects.

  Attributes:
    message: the message alone (wrappers such as gin append to str(error)).
    parameters: the rejected parameters' names, bare ("sigma") or qualified
      by their owner ("HybridRPES.sigma"), the one at fault first.
  """

  def __init__(self, message: str, *parameters: str):
    super().__init__(message)
    self.message = message
    self.parameters = parameters


class InvalidArgumentType(InvalidArgument, TypeError):
  """An argument of a type the function or class does not take."""
