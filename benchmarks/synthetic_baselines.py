"""How hard is the synthetic set for a linear model? Prints logistic-regression accuracy.

Run: ``python benchmarks/synthetic_baselines.py [--num-train 10000]``
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cejax.data import synthetic_gen


def arrays(seed, start, num, size):
  xs, ys = zip(*[synthetic_gen.generate_example(seed, start + i, image_size=size)[:2]
                 for i in range(num)])
  return np.stack(xs).reshape(num, -1).astype(np.float32) / 255.0, np.array(ys)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num-train", type=int, default=10_000)
  parser.add_argument("--num-test", type=int, default=1_000)
  parser.add_argument("--image-size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=500)
  args = parser.parse_args()
  x_train, y_train = arrays(0, 0, args.num_train, args.image_size)
  x_test, y_test = arrays(0, 2_000_003, args.num_test, args.image_size)  # the test split
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
  k = len(synthetic_gen.CLASS_NAMES)
  for l2 in (1e-4, 1e-3, 1e-2):
    params = {"w": jnp.zeros((x_train.shape[1], k)), "b": jnp.zeros(k)}
    opt = optax.adam(1e-3)

    def loss(p):
      logits = x_train @ p["w"] + p["b"]
      return (optax.softmax_cross_entropy_with_integer_labels(logits, y_train).mean()
              + l2 * jnp.sum(p["w"] ** 2))

    @jax.jit
    def step(p, s):
      u, s = opt.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(args.steps):
      params, state = step(params, state)
    acc = lambda x, y: float(((x @ params["w"] + params["b"]).argmax(1) == y).mean())
    print(f"logistic regression, l2={l2:g}: train {acc(x_train, y_train):.3f}, "
          f"test {acc(x_test, y_test):.3f}")
  print(f"majority class: test {np.bincount(y_test).max() / len(y_test):.3f}")


if __name__ == "__main__":
  main()
