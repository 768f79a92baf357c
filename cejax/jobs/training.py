"""Training a DenseNet with Optax, data parallel over every device.

``train_and_evaluate(config, workdir)`` is the whole job; ``train_step`` and
``eval_step`` are pure functions of ``(graphdef, state, batch)``.

The train state is a dict ``{step, params, batch_stats, opt_state}`` of plain
arrays, replicated over a 1-D ``data`` mesh; batches are sharded along it. A run
resumes from its latest checkpoint; the batch of a step depends only on
``(seed, step)``, so a resumed run trains exactly the steps an uninterrupted one
would.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from cejax import data, metrics, precision
from cejax.estimands import check_activation
from cejax.jobs import checkpoint, run_identity, store
from cejax.jobs import config as config_lib
from cejax.models import densenet

_log = logging.getLogger(__name__)

def make_optimizer(train_config, *, steps_per_epoch: int) -> optax.GradientTransformation:
  total = max(1, int(train_config.num_epochs * steps_per_epoch))
  warmup = int(train_config.warmup_epochs * steps_per_epoch)
  lr = train_config.learning_rate
  if train_config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps=warmup, decay_steps=max(total, warmup + 1))
  elif train_config.schedule == "constant":
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)],
        [max(warmup, 1)]) if warmup else optax.constant_schedule(lr)
  else:
    raise ValueError(f"Unknown config.train.schedule {train_config.schedule!r}; valid "
                     "are ['constant', 'cosine'].")
  name = train_config.optimizer
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=train_config.weight_decay)
  if name == "adam":
    return optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                       optax.adam(schedule))
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(train_config.weight_decay),
                       optax.sgd(schedule, momentum=train_config.momentum, nesterov=True))
  raise ValueError(f"Unknown config.train.optimizer {name!r}; valid are "
                   "['adam', 'adamw', 'sgd'].")


def loss_and_metrics(logits, labels, *, activation: str, weights=None):
  """Mean loss and summed correct counts.

  ``activation="softmax"``: softmax cross-entropy (``labels`` int ``(n,)``);
  ``"sigmoid"`` (multi-label): binary cross-entropy averaged over findings
  (``labels`` ``(n, k)``).
  """
  logits = logits.astype(jnp.float32)
  if weights is None:
    weights = jnp.ones(logits.shape[0], jnp.float32)
  if check_activation(activation) == "sigmoid":
    per_example = optax.sigmoid_binary_cross_entropy(logits, labels).mean(-1)
    correct = ((logits > 0) == (labels > 0.5)).mean(-1)
  else:
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  count = weights.sum()
  loss = (per_example * weights).sum() / jnp.maximum(count, 1.0)
  return loss, {"loss_sum": (per_example * weights).sum(),
                "correct": (correct * weights).sum(), "count": count}


def train_step(graphdef, state, batch, *, optimizer, activation):
  """One optimizer step; returns the new state and ``{loss, accuracy}``."""

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state["batch_stats"])
    logits = model(batch["image"])
    _, new_stats = nnx.split(model, nnx.Param, nnx.BatchStat)[1:]
    loss, m = loss_and_metrics(logits, batch["label"], activation=activation)
    return loss, (nnx.to_pure_dict(new_stats), m)

  (loss, (batch_stats, m)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state["params"])
  updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  new_state = {"step": state["step"] + 1, "params": params,
               "batch_stats": batch_stats, "opt_state": opt_state}
  return new_state, {"loss": loss, "accuracy": m["correct"] / m["count"]}


def eval_step(graphdef, state, batch):
  """Logits of a batch in eval mode (graphdef must be an eval-mode graph)."""
  return nnx.merge(graphdef, state["params"], state["batch_stats"])(batch["image"])


def make_mesh(devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def run_description(config, dataset: data.Dataset) -> dict[str, Any]:
  return {
      "preset": config.model.preset,
      "num_classes": dataset.num_classes,
      "in_channels": config.data.channels,
      "dtype": config.model.dtype,
      "overrides": config_lib.model_overrides(config),
      "class_names": list(dataset.class_names),
      "multi_label": dataset.multi_label,
      "mean": dataset.normalization.mean.tolist(),
      "std": dataset.normalization.std.tolist(),
      "image_size": config.data.crop_size or config.data.image_size,
      "best_metric": config.train.best_metric,
      # Every data setting that decides the images: jobs on this run take them from here.
      "data": run_identity.data_identity(config.data),
  }


def init_state(model: densenet.DenseNet, optimizer) -> tuple[Any, dict]:
  model.train()
  graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)
  state = {"step": jnp.zeros((), jnp.int32), "params": params,
           "batch_stats": batch_stats, "opt_state": optimizer.init(params)}
  return graphdef, state


def evaluate(eval_fn, state, dataset, split, *, batch_size, sharding, limit=None):
  """Accuracy and loss over a split; per-class and mean AUROC when multi-label."""
  all_logits, all_labels = [], []
  # Round the batch up so it splits evenly over the devices (padding is masked).
  devices = sharding.mesh.size
  batch_size = -(-batch_size // devices) * devices
  for batch in data.eval_batches(dataset, split, batch_size=batch_size, limit=limit):
    logits = eval_fn(state, jax.device_put(batch["image"], sharding))
    valid = batch["valid"]
    all_logits.append(np.asarray(logits)[valid])
    all_labels.append(batch["label"][valid])
  logits = np.concatenate(all_logits).astype(np.float64)
  labels = np.concatenate(all_labels)
  loss, m = loss_and_metrics(jnp.asarray(logits), jnp.asarray(labels),
                             activation=dataset.activation)
  out = {"loss": float(loss), "accuracy": float(m["correct"] / m["count"]),
         "count": int(m["count"])}
  if dataset.multi_label:
    aucs = [metrics.auroc(logits[:, k], labels[:, k]) for k in range(labels.shape[1])]
    out.update({f"auroc/{n}": a for n, a in zip(dataset.class_names, aucs, strict=True)})
    finite = [a for a in aucs if not math.isnan(a)]
    out["mean_auroc"] = float(np.mean(finite)) if finite else float("nan")
  return out


def _append_jsonl(path: Path, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_jsonl(path: Path, *, max_step: int) -> None:
  """Drops records newer than the checkpoint a run resumes from."""
  if not path.exists():
    return
  keep = [line for line in path.read_text().splitlines()
          if line and json.loads(line)["step"] <= max_step]
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in keep))
  tmp.replace(path)


def train_and_evaluate(config, workdir, *, devices=None, fresh: bool = False,
                       step_hook: Callable[[int], None] | None = None) -> dict:
  """Trains per ``config``, checkpointing to and resuming from ``workdir``.

  Args:
    config: a run config (see ``configs/``).
    workdir: where run.json, checkpoints and metrics.jsonl go.
    devices: devices of the data-parallel mesh (default: all).
    fresh: start the workdir over (its checkpoints, metrics and run.json are deleted).
    step_hook: called with each completed step number (tests use it to kill a run).

  Returns:
    The final validation metrics, and the test metrics of the best checkpoint
    under ``"test"``.

  Raises:
    FloatingPointError: the training loss became NaN or infinite.
    ValueError: a bad config, or a workdir that holds a run of another model or other
      data (nothing is changed; ``fresh`` starts it over).
  """
  config_lib.validate(config, "train")  # the whole config, once, before anything else
  if fresh:
    checkpoint.start_over(workdir)
  # Every program the run compiles is traced under the precision policy (exact: float32
  # products on every backend; cejax.precision).
  with precision.policy(config.precision):
    return _train(config, workdir, devices=devices, step_hook=step_hook)


def _train(config, workdir, *, devices, step_hook):
  from tqdm.auto import tqdm

  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tc = config.train
  dataset = data.load_dataset(config.data)
  num_train = dataset.num_examples("train")
  steps_per_epoch = num_train // tc.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.train.batch_size={tc.batch_size} exceeds the {num_train} "
                     "training examples.")
  num_steps = int(tc.num_epochs * steps_per_epoch)
  run = run_description(config, dataset)
  checkpoint.check_or_write_run(workdir, run)

  mesh = make_mesh(devices)
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P("data"))
  if tc.batch_size % mesh.size:
    raise ValueError(f"config.train.batch_size={tc.batch_size} must be divisible by the "
                     f"{mesh.size} devices.")

  optimizer = make_optimizer(tc, steps_per_epoch=steps_per_epoch)
  model = checkpoint.build_model(run, seed=tc.seed)
  graphdef, state = init_state(model, optimizer)
  model.eval()
  eval_graphdef = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
  state = jax.device_put(state, replicated)

  ckpt = checkpoint.Checkpointer(workdir, keep=tc.keep_checkpoints,
                                 best_metric=tc.best_metric)
  metrics_path = workdir / "metrics.jsonl"
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, state)
    _truncate_jsonl(metrics_path, max_step=start)
    print(f"Resuming from step {start} of {num_steps} in {workdir}.")
  start = start or 0

  step_fn = jax.jit(
      functools.partial(train_step, graphdef, optimizer=optimizer,
                        activation=dataset.activation),
      in_shardings=(replicated, sharded), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, eval_graphdef),
                    in_shardings=(replicated, {"image": sharded}),
                    out_shardings=replicated)
  eval_images = lambda s, images: eval_fn(s, {"image": images})  # noqa: E731

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharded, batch[k])
            for k in ("image", "label")}

  val = {}
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step",
             disable=jax.process_index() != 0)
  for step, batch in data.train_batches(dataset, batch_size=tc.batch_size, seed=tc.seed,
                                        start_step=start, num_steps=num_steps):
    state, m = step_fn(state, to_global(batch))
    done = step + 1
    if done % tc.log_every_steps == 0 or done == num_steps:
      loss = float(m["loss"])
      if not math.isfinite(loss):
        raise FloatingPointError(
            f"Training loss is {loss} at step {done}; stopping. The last good "
            f"checkpoint is step {ckpt.latest_step()} in {workdir}. Lower "
            "config.train.learning_rate or check the input data.")
      bar.set_postfix(loss=f"{loss:.4f}", acc=f"{float(m['accuracy']):.3f}")
    bar.update(1)
    if done % steps_per_epoch == 0 or done == num_steps:
      val = evaluate(eval_images, state, dataset, "validation",
                     batch_size=tc.eval_batch_size, sharding=sharded)
      ckpt.save(done, state, metrics={tc.best_metric: val[tc.best_metric]})
      record = {"step": done, "epoch": done / steps_per_epoch, "split": "validation",
                **val}
      if jax.process_index() == 0:
        _append_jsonl(metrics_path, record)
      bar.write(f"epoch {done / steps_per_epoch:.2f} step {done}: " + ", ".join(
          f"{k}={v:.4f}" for k, v in val.items() if "/" not in k and k != "count"))
    elif done % tc.checkpoint_every_steps == 0:
      ckpt.save(done, state)
    if step_hook is not None:
      step_hook(done)
  bar.close()

  best = ckpt.best_step() or ckpt.latest_step()
  if best is not None and best != int(state["step"]):
    state = ckpt.restore(best, state)
  test = evaluate(eval_images, state, dataset, "test", batch_size=tc.eval_batch_size,
                  sharding=sharded)
  ckpt.close()
  if jax.process_index() == 0:
    store.write_json_atomic(workdir / "test_metrics.json",
                                 {"step": best, **test})
  print(f"Test metrics of step {best}: accuracy={test['accuracy']:.4f}"
        + (f", mean_auroc={test['mean_auroc']:.4f}" if "mean_auroc" in test else ""))
  return {**val, "test": test}
