"""All Orbax code: saving and restoring runs, and ``load_logits_fn``.

A workdir holds::

    run.json        what the model is (preset, classes, channels, normalization)
    checkpoints/    Orbax steps, each {step, params, batch_stats, opt_state}
    metrics.jsonl   evaluation results, one JSON object per line

Orbax writes each step to a temporary directory and renames it when complete, so
a killed run never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from cejax.jobs.store import write_json_atomic
from cejax.models import densenet, vit

_log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# Fields of run.json that must agree between a config and an existing workdir: the
# model, and every data setting that decides the images (a resume on other data would
# train on a mix, and test_metrics.json would score the old model on the new data).
_RUN_FIELDS = ("preset", "num_classes", "in_channels", "dtype", "overrides", "data")


def is_vit(run: dict[str, Any]) -> bool:
  """Whether a run's model is a Vision Transformer (a preset of ``vit.PRESETS``)."""
  return run["preset"] in vit.PRESETS


def build_model(run: dict[str, Any], *,
                seed: int = 0) -> densenet.DenseNet | vit.VisionTransformer:
  """The model described by a ``run.json`` dict, freshly initialised."""
  if is_vit(run):
    # Built for the run's images (a preset names its patch size and width, not a size).
    return vit.create_vit(run["preset"], num_classes=run["num_classes"],
                          in_channels=run["in_channels"], img_size=run["image_size"],
                          dtype=jnp.dtype(run["dtype"]), rngs=nnx.Rngs(seed),
                          **run.get("overrides", {}))
  return densenet.create_densenet(
      run["preset"], num_classes=run["num_classes"], in_channels=run["in_channels"],
      dtype=jnp.dtype(run["dtype"]), rngs=nnx.Rngs(seed), **run.get("overrides", {}))


def abstract_model(run: dict[str, Any]) -> densenet.DenseNet | vit.VisionTransformer:
  """The model of ``run`` with shapes and dtypes only (``nnx.eval_shape``), for weights
  that come from elsewhere: initialising them eagerly compiles and runs every
  initialiser (DenseNet-121 in a fresh process: 14.5 s against 1.0 s,
  ``benchmarks/model_build_time.py``)."""
  return nnx.eval_shape(lambda: build_model(run))


def check_or_write_run(workdir: Path, run: dict[str, Any]) -> None:
  """Writes run.json, or checks that an existing one describes the same model.

  Raises:
    ValueError: the workdir holds a different model (nothing is overwritten).
  """
  path = Path(workdir) / RUN_FILE
  if path.exists():
    old = json.loads(path.read_text())
    diff = {}
    for k in _RUN_FIELDS:
      a, b = old.get(k), run.get(k)
      if k == "data" and isinstance(a, str) and isinstance(b, dict):
        # An older run.json records the data set's name only: check what it has.
        _log.warning("%s records only the data set's name (written by an older cejax); "
                     "its other data settings cannot be checked.", path)
        a, b = a, b.get("name")
      if isinstance(a, dict) and isinstance(b, dict):
        diff.update({f"{k}.{f}": (a.get(f), b.get(f)) for f in sorted(set(a) | set(b))
                     if a.get(f) != b.get(f)})
      elif a != b:
        diff[k] = (a, b)
    if diff:
      named = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
      raise ValueError(
          f"Workdir {workdir} holds a run of another model or other data ({named}). "
          "Use a new --workdir, or --fresh to start this one over; nothing was "
          "changed.")
    return
  write_json_atomic(path, run)


def start_over(workdir: Path) -> None:
  """Deletes a workdir's run (checkpoints, metrics, run.json) so it can be trained anew."""
  import shutil

  workdir = Path(workdir)
  shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
  for name in (RUN_FILE, "metrics.jsonl", "test_metrics.json"):
    (workdir / name).unlink(missing_ok=True)


def read_run(workdir: Path) -> dict[str, Any]:
  path = Path(workdir) / RUN_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a cejax workdir (train.py writes it).")
  return json.loads(path.read_text())


def _host_copy_if_replicated(leaf):
  if isinstance(leaf, jax.Array) and leaf.sharding.is_fully_replicated:
    return np.asarray(leaf.addressable_data(0))
  return leaf


class Checkpointer:
  """Keeps the last ``keep`` checkpoints and the best one by a validation metric."""

  def __init__(self, workdir: Path, *, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max"):
    if keep < 1:
      raise ValueError(f"keep must be at least 1, got {keep}.")
    policies = [pp.LatestN(n=keep)]
    if best_metric:
      policies.append(pp.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.manager = ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            # best_fn makes Orbax store each step's metrics; retention is
            # decided by the preservation policy above.
            best_fn=(lambda m: m[best_metric]) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=False,
            create=True,
        ),
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def best_step(self) -> int | None:
    """The step with the best ``best_metric``, or None."""
    if not self.best_metric:
      return None
    step = self.manager.best_step()
    # Orbax falls back to the latest step when none has metrics; we do not.
    return step if step is not None and self.manager.metrics(step) else None

  def save(self, step: int, state, *, metrics: dict | None = None) -> None:
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items()}
    # Replicated arrays are saved from one host copy: for a jax.Array on several devices
    # Orbax splits the write across the replicas with one dispatched slice per array and
    # replica (a compilation per shape; 2 s per save of the smoke model on 8 CPU
    # devices). A numpy leaf is written by process 0 alone and restored into the target's
    # sharding, so the checkpoint and what restore returns are the same.
    state = jax.tree.map(_host_copy_if_replicated, state)
    self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, target):
    """Restores ``step`` into the structure (and shardings) of ``target``.

    Raises:
      ValueError: the checkpoint's structure does not match ``target``.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"Checkpoint step {step} in {self.manager.directory} does not match the "
          f"model being restored: {e}") from e

  def close(self) -> None:
    self.manager.close()


def _model_variables(model: nnx.Module):
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def load_model(workdir: Path, *, step: int | str = "best", compute_dtype: str | None = None):
  """Restores ``(graphdef, params, batch_stats, run)`` in eval mode.

  Args:
    workdir: a training workdir.
    step: ``"best"`` (by the validation metric; the latest when none), ``"latest"``
      or a step number.
    compute_dtype: the dtype the restored model computes in (default: the one it was
      trained with, ``run["dtype"]``); the weights are float32 either way.
  """
  run = read_run(workdir)
  model = abstract_model(run if compute_dtype is None else dict(run, dtype=compute_dtype))
  model.eval()
  graphdef, params, batch_stats = _model_variables(model)
  ckpt = Checkpointer(workdir, best_metric=run.get("best_metric"))
  try:
    if step == "best":
      step = ckpt.best_step() or ckpt.latest_step()
    elif step == "latest":
      step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints.")
    # Restore the weights only; the optimizer state is not needed for analysis.
    restored = ckpt.manager.restore(step, args=ocp.args.PyTreeRestore(
        item={"params": params, "batch_stats": batch_stats},
        restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                  {"params": params, "batch_stats": batch_stats}),
        partial_restore=True))
  finally:
    ckpt.close()
  # One transfer of the whole tree (jnp.asarray per leaf dispatches a program each).
  params, batch_stats = jax.device_put((restored["params"], restored["batch_stats"]))
  return graphdef, params, batch_stats, dict(run, step=int(step))


def make_logits_fn(graphdef, params, batch_stats) -> Callable[[jax.Array], jax.Array]:
  """A pure ``images (n, h, w, c) -> logits (n, k)`` closure over eval-mode weights."""

  def logits_fn(images: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, batch_stats)(images)

  return logits_fn


def make_stage_fns(graphdef, params, batch_stats, stage: str):
  """Pure ``(prefix_fn, suffix_fn)`` split at ``stage``: ``suffix(prefix(x))`` is the model.

  Raises:
    ValueError: unknown stage (the message lists the valid ones).
  """
  nnx.merge(graphdef, params, batch_stats).stage_index(stage)

  def prefix_fn(images):
    return nnx.merge(graphdef, params, batch_stats).forward_to(images, stage)

  def suffix_fn(features):
    return nnx.merge(graphdef, params, batch_stats).forward_from(features, stage)

  return prefix_fn, suffix_fn


def make_cam_fns(graphdef, params, batch_stats):
  """Pure ``(features_fn, classify_fn)`` for the CAM family (``cejax.saliency``).

  ``features_fn(images)`` is the last feature map after the final BN + ReLU,
  ``(n, h', w', C)``; ``classify_fn(features)`` is global average pooling and the
  linear head, so ``classify_fn(features_fn(x))`` is the model.
  """

  def features_fn(images):
    return nnx.merge(graphdef, params, batch_stats).features(images)

  def classify_fn(features):
    return nnx.merge(graphdef, params, batch_stats).classify(features)

  return features_fn, classify_fn


def load_logits_fn(workdir: Path, *, step: int | str = "best"):
  """The trained model of ``workdir`` as a pure ``images -> logits`` function.

  The function is in eval mode (BatchNorm uses running statistics) and safe under
  ``jit``, ``vmap`` and ``grad``. Images are normalized NHWC float32 as the run's
  pipeline produced them; ``run["mean"]``/``run["std"]`` give the normalization.

  Returns:
    ``(logits_fn, run)``, where ``run`` is the workdir's run.json plus ``step``.
  """
  graphdef, params, batch_stats, run = load_model(workdir, step=step)
  return make_logits_fn(graphdef, params, batch_stats), run


def activation_of(run) -> str:
  """The output activation of a run: ``"sigmoid"`` for a multi-label data set (one
  binary finding per output, as ChestX-ray14), else ``"softmax"``. ``run.json`` keeps
  the data set's ``multi_label`` flag; the library speaks of ``activation`` only."""
  return "sigmoid" if run.get("multi_label") else "softmax"
