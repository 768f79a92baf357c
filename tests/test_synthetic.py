"""The embedded synthetic set: determinism, causal ground truth, and difficulty."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cejax.data import synthetic_gen


def test_examples_are_deterministic_functions_of_seed_and_index():
  a = synthetic_gen.generate_example(3, 17)
  b = synthetic_gen.generate_example(3, 17)
  c = synthetic_gen.generate_example(4, 17)
  np.testing.assert_array_equal(a[0], b[0])
  assert not np.array_equal(a[0], c[0])
  assert a[0].shape == (64, 64, 1) and a[0].dtype == np.uint8


def test_label_changes_only_pixels_inside_the_box():
  """do(label): the image outside the ground-truth box must not move at all."""
  for index in range(40):
    images = {}
    for label in range(len(synthetic_gen.CLASS_NAMES)):
      image, _, boxes = synthetic_gen.generate_example(0, index, label=label)
      images[label] = (image[..., 0].astype(int), boxes)
    box = images[1][1][0].astype(int)
    outside = np.ones((64, 64), bool)
    outside[box[1]:box[3], box[0]:box[2]] = False
    for label in range(2, len(synthetic_gen.CLASS_NAMES)):
      np.testing.assert_array_equal(images[label][1], images[1][1])  # same box
    for label in range(len(synthetic_gen.CLASS_NAMES)):
      np.testing.assert_array_equal(images[label][0][outside], images[0][0][outside])
    # and the finding does change the inside
    inside = ~outside
    assert np.abs(images[1][0][inside] - images[0][0][inside]).mean() > 5


def test_no_finding_has_no_box_and_findings_one():
  labels = []
  for index in range(60):
    _, label, boxes = synthetic_gen.generate_example(1, index)
    labels.append(label)
    assert len(boxes) == (0 if label == 0 else 1)
    if len(boxes):
      x0, y0, x1, y1 = boxes[0]
      assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
  assert set(labels) == set(range(len(synthetic_gen.CLASS_NAMES)))


def _arrays(seed, start, num, size):
  xs, ys = zip(*[synthetic_gen.generate_example(seed, start + i, image_size=size)[:2]
                 for i in range(num)])
  return np.stack(xs).reshape(num, -1).astype(np.float32) / 255.0, np.array(ys)


def test_logistic_regression_on_raw_pixels_stays_below_60_percent():
  """The task needs a CNN: a linear model on pixels must not solve it."""
  x_train, y_train = _arrays(0, 0, 3000, 64)
  x_test, y_test = _arrays(0, 10_000_000, 1000, 64)
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  k = len(synthetic_gen.CLASS_NAMES)
  params = {"w": jnp.zeros((x_train.shape[1], k)), "b": jnp.zeros(k)}
  opt = optax.adam(5e-3)  # 60 full-batch steps: 75 % of the training set, 28 % of test

  def loss(p, x, y):
    logits = x @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() \
        + 1e-3 * jnp.sum(p["w"] ** 2)

  @jax.jit  # the data are arguments, not constants folded into the program
  def step(p, s, x, y):
    g = jax.grad(loss)(p, x, y)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for _ in range(60):
    params, state = step(params, state, x_train, y_train)
  train_acc = float(((x_train @ params["w"] + params["b"]).argmax(1) == y_train).mean())
  test_acc = float(((x_test @ params["w"] + params["b"]).argmax(1) == y_test).mean())
  assert train_acc > 0.5  # the linear model did fit something...
  assert test_acc < 0.60  # ...but it does not generalise


def test_rejects_tiny_images_and_bad_labels():
  with pytest.raises(ValueError, match="image_size"):
    synthetic_gen.generate_example(0, 0, image_size=16)
  with pytest.raises(ValueError, match="label"):
    synthetic_gen.generate_example(0, 0, label=9)
