"""Bad configuration as one line: classified by exception type, described by gin binding.

`python -m pathology_fix.train` refuses a run with one `error:` line (exit
status 2, the run directory left as it was) when

* gin cannot parse the config: `PARSE_ERRORS`, raised while parsing
  (unknown configurable or parameter, a failing `import` line, syntax);
* a configurable rejects a value: `REJECTED_VALUES`, the exceptions the
  plugin's argument checks raise (`errors.InvalidArgument`, a missing
  dataset); they carry the rejected parameters' names;
* gin itself refuses a call (a required binding is missing, a configurable
  is called without an argument): any error raised from gin's own code.

Anything else is a failure, reported with its traceback.

The line is the error's own message, plus the user's gin binding of each
parameter the error names, e.g. `HybridRPES.sigma must be > 0, got -1.0
(gin: VariationalEstimator.sigma = -1.0)`. The binding is looked up on the
gin configurables whose code is on the error's traceback, innermost first: a
class and its gin-registered base classes (`VariationalEstimator.*` applies
to `HybridRPES`), or a function (`sample_digits_family.batch_size` reaches
`digits_datasets`); unscoped, or in LO main's "default_scope", into which its
run_train moves every binding.
"""

import re
import tokenize
from typing import Iterator, List, Optional

import gin

from pathology_fix.tasks_and_data import data
from pathology_fix_core import errors

# What gin raises while parsing a bad config.
PARSE_ERRORS = (ValueError, ImportError, SyntaxError, tokenize.TokenError,
                OSError)
# What the plugin's argument checks raise.
REJECTED_VALUES = (errors.InvalidArgument, data.DatasetNotFoundError)
# LO GitHub main's run_train moves every binding into this scope.
_LO_MAIN_SCOPE = "default_scope"


def one_line(error: BaseException) -> str:
  """First line of a (gin) error message, plus where gin says it happened."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  where = next((l for l in lines[1:] if l.startswith("In ")), None)
  return f"{lines[0]} ({where[3:]})" if where else lines[0]


def _innermost_frame(error: BaseException):
  tb = error.__traceback__
  if tb is None:
    return None
  while tb.tb_next is not None:
    tb = tb.tb_next
  return tb.tb_frame


def raised_by_gin(error: BaseException) -> bool:
  frame = _innermost_frame(error)
  return frame is not None and frame.f_globals.get(
      "__name__", "").split(".")[0] == "gin"


def is_config_error(error: BaseException) -> bool:
  """A rejected value, or a call gin refused (see the module docstring)."""
  return isinstance(error, REJECTED_VALUES) or (
      isinstance(error, (ValueError, TypeError, RuntimeError)) and
      raised_by_gin(error))


def _frames(error: BaseException) -> List:
  """The traceback's frames, innermost first."""
  frames, tb = [], error.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  return frames[::-1]


def _code_owners(frame) -> Iterator:
  """The class (with its bases) or module function whose code `frame` runs."""
  instance = frame.f_locals.get("self")
  if instance is not None:
    yield from type(instance).__mro__
  function = frame.f_globals.get(frame.f_code.co_name)
  wrapped = getattr(function, "__wrapped__", function)  # gin's functools.wraps
  if getattr(wrapped, "__code__", None) is frame.f_code:
    yield function


def _is_configurable(obj) -> bool:
  try:
    gin.get_bindings(obj, resolve_references=False)
  except ValueError:  # not in gin's registry
    return False
  return True


def _configurables(error: BaseException) -> List:
  """The gin configurables on the traceback, innermost first."""
  found = []
  for frame in _frames(error):
    for owner in _code_owners(frame):
      if owner not in found and _is_configurable(owner):
        found.append(owner)
  return found


def _binding(configurable, parameter: str) -> Optional[str]:
  """"Name.parameter = value" if gin has it bound, else None."""
  for scope in (None, _LO_MAIN_SCOPE):
    with gin.config_scope(scope):
      bound = gin.get_bindings(configurable, resolve_references=False)
    if parameter in bound:
      return f"{configurable.__name__}.{parameter} = {bound[parameter]!r}"
  return None


_GIN_CALL = re.compile(r"In call to configurable '([^']+)'")


def construction_error(error: BaseException) -> Optional[str]:
  """One line for an error gin reports from a configurable's call, else None.

  While the config's objects are built, any such error is the config's: a
  value of the wrong kind (e.g. `task_family = None`) that the callee (often
  learned_optimization's) rejects in its own way.
  """
  match = _GIN_CALL.search(str(error))
  if match is None:
    return None
  first = next((l.strip() for l in str(error).splitlines() if l.strip()),
               type(error).__name__)
  return (f"{first} (in call to configurable {match.group(1)}; check its gin "
          "bindings)")


def describe(error: BaseException) -> str:
  """The error's message, plus the gin bindings of the parameters it names."""
  message = getattr(error, "message", None) or one_line(error)
  parameters = [p.rsplit(".", 1)[-1] for p in getattr(error, "parameters", ())]
  configurables = _configurables(error)
  bindings = []
  for parameter in parameters:
    for configurable in configurables:
      binding = _binding(configurable, parameter)
      if binding is None:
        continue
      # The innermost binding is the one in effect (a subclass's wins).
      if binding not in bindings and binding.split(" = ")[0] not in message:
        bindings.append(binding)
      break
  if bindings:
    return f"{message} (gin: {'; '.join(bindings)})"
  named = any("." in p for p in getattr(error, "parameters", ()))
  if configurables and not named and configurables[0].__name__ not in message:
    return f"{message} (in call to configurable {configurables[0].__name__})"
  return message
