"""Counts XLA compilations, for the compile-once tests."""

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compilations:
  """Context manager: ``count`` of XLA compilations inside the block (JAX's
  backend-compile monitoring event)."""

  def __enter__(self):
    self.count = 0

    def listener(event, *args, **kwargs):
      del args, kwargs
      self.count += event == COMPILE_EVENT

    self._listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)
