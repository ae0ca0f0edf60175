"""An in-process stand-in for `courier` (dm-launchpad's RPC library).

dm-launchpad has no build for current Python. LO uses courier for its
learner/worker and population servers; with this stand-in those run as
threads of one process (as LO's own tests and single-machine runs do).
Reaching a server that lives in another process needs the real courier.
"""

import threading
import time

_SERVERS = {}
_REGISTRY_LOCK = threading.Condition()
CONNECT_TIMEOUT_S = 120.0


class Server:
  """Serves bound Python callables to `Client`s of the same process."""

  def __init__(self, name, port=None):
    self.name = name
    # No socket is opened; clients may still address the server by port.
    self._addresses = [name] + ([f"localhost:{port}"] if port else [])
    self._methods = {}

  def Bind(self, method_name, fn):  # pylint: disable=invalid-name
    self._methods[method_name] = fn

  def Start(self):  # pylint: disable=invalid-name
    with _REGISTRY_LOCK:
      for address in self._addresses:
        _SERVERS[address] = self
      _REGISTRY_LOCK.notify_all()

  def Stop(self):  # pylint: disable=invalid-name
    with _REGISTRY_LOCK:
      for address in self._addresses:
        if _SERVERS.get(address) is self:
          del _SERVERS[address]

  def Join(self):  # pylint: disable=invalid-name
    while _SERVERS.get(self.name) is self:
      time.sleep(0.5)

  def call(self, method_name, *args, **kwargs):
    if method_name not in self._methods:
      raise AttributeError(
          f"courier server {self.name!r} has no method {method_name!r}")
    return self._methods[method_name](*args, **kwargs)


def _wait_for_server(name):
  deadline = time.monotonic() + CONNECT_TIMEOUT_S
  with _REGISTRY_LOCK:
    while name not in _SERVERS:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise ConnectionError(
            f"No courier server named {name!r} in this process after "
            f"{CONNECT_TIMEOUT_S:.0f}s. pathology_fix's courier stand-in only "
            "connects threads of one process; multi-process training needs the "
            "real courier from dm-launchpad.")
      _REGISTRY_LOCK.wait(timeout=min(remaining, 1.0))
    return _SERVERS[name]


class Client:
  """Calls methods of the `Server` with the same name, in this process."""

  def __init__(self, name):
    self._name = name

  def __getattr__(self, method_name):
    if method_name.startswith("__"):
      raise AttributeError(method_name)

    def remote_call(*args, **kwargs):
      return _wait_for_server(self._name).call(method_name, *args, **kwargs)

    return remote_call
