"""Counts XLA compilations, for the compile-once tests."""

import jax

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
# conftest.py turns on JAX's persistent compilation cache: a program served from it
# skips the backend compile, so a hit counts as the compilation it stands for.
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


class Compilations:
  """Context manager: ``count`` of XLA compilations inside the block (JAX's
  backend-compile monitoring event, or a persistent-cache hit in its place)."""

  def __enter__(self):
    self.count = 0

    def listener(event, *args, **kwargs):
      del args, kwargs
      self.count += event == COMPILE_EVENT

    def hit_listener(event, **kwargs):
      del kwargs
      self.count += event == CACHE_HIT_EVENT

    self._listener, self._hit_listener = listener, hit_listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.monitoring.register_event_listener(hit_listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)
    jax.monitoring.unregister_event_listener(self._hit_listener)
