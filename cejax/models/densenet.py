"""DenseNet-BC in Flax NNX, laid out exactly like torchvision's DenseNet.

The network is a sequence of named *stages*::

    stem, block1, transition1, block2, ..., block{n}, head

``head`` is the final BatchNorm + ReLU (its output is the last feature map, used by
the CAM family), global average pooling and the linear classifier. Any stage can
split the network into ``prefix`` and ``suffix`` functions with
``suffix(prefix(x)) == model(x)``; latent interventions rely on that.

Images are NHWC. In eval mode (``model.eval()``) BatchNorm uses its running
statistics, so the forward pass is a pure function of the image.

Example::

    model = DenseNet121(num_classes=14, rngs=nnx.Rngs(0))
    model.eval()
    logits = model(jnp.zeros((1, 224, 224, 3)))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cejax.models import initializers
from cejax.models._conv import spatial as spatial_conv
from cejax.models._tracing import short_sharding_errors

# torchvision's BatchNorm2d defaults: momentum 0.1 (flax counts the other way), eps 1e-5.
_BN_MOMENTUM = 0.9
_BN_EPSILON = 1e-5


def _batch_norm(num_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(
      num_features, momentum=_BN_MOMENTUM, epsilon=_BN_EPSILON, dtype=dtype, rngs=rngs
  )


def _conv(in_features, out_features, kernel, *, stride=1, padding=0, dtype, rngs):
  # Kaiming-normal (fan_in) init as in torchvision; no bias, as BatchNorm follows.
  return nnx.Conv(
      in_features,
      out_features,
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      padding=((padding, padding), (padding, padding)),
      use_bias=False,
      kernel_init=initializers.variance_scaling(2.0, "fan_in", "normal"),
      dtype=dtype,
      rngs=rngs,
  )


def pointwise(conv: nnx.Conv, x: jax.Array) -> jax.Array:
  """A bias-free 1x1 convolution as a matrix product over the channel axis.

  Same parameters and the same math as ``conv(x)``; XLA:CPU runs the dot about twice
  as fast as a 1x1 convolution (docs/benchmarks.md), and most of DenseNet's FLOPs
  are in 1x1 convolutions.
  """
  dtype = conv.dtype or x.dtype
  return jnp.dot(x.astype(dtype), conv.kernel[...][0, 0].astype(dtype))


class DenseLayer(nnx.Module):
  """BN-ReLU-Conv1x1-BN-ReLU-Conv3x3, output concatenated to the input."""

  def __init__(self, in_features, *, growth_rate, bn_size, dtype, rngs):
    width = bn_size * growth_rate
    self.norm1 = _batch_norm(in_features, dtype=dtype, rngs=rngs)
    self.conv1 = _conv(in_features, width, 1, dtype=dtype, rngs=rngs)
    self.norm2 = _batch_norm(width, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(width, growth_rate, 3, padding=1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    y = pointwise(self.conv1, nnx.relu(self.norm1(x)))
    y = spatial_conv(self.conv2, nnx.relu(self.norm2(y)))
    return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nnx.Module):
  def __init__(self, in_features, *, num_layers, growth_rate, bn_size, dtype, rngs):
    self.layers = nnx.List([
        DenseLayer(
            in_features + i * growth_rate,
            growth_rate=growth_rate,
            bn_size=bn_size,
            dtype=dtype,
            rngs=rngs,
        )
        for i in range(num_layers)
    ])

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return x


class Transition(nnx.Module):
  """BN-ReLU-Conv1x1, then 2x2 average pooling."""

  def __init__(self, in_features, out_features, *, dtype, rngs):
    self.norm = _batch_norm(in_features, dtype=dtype, rngs=rngs)
    self.conv = _conv(in_features, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = pointwise(self.conv, nnx.relu(self.norm(x)))
    return nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


class Stem(nnx.Module):
  """Conv, BN, ReLU and (optionally) 3x3/2 max pooling."""

  def __init__(self, in_channels, out_features, *, kernel, stride, pool, dtype, rngs):
    self.conv = _conv(
        in_channels, out_features, kernel, stride=stride, padding=kernel // 2,
        dtype=dtype, rngs=rngs,
    )
    self.norm = _batch_norm(out_features, dtype=dtype, rngs=rngs)
    self.pool = pool

  def __call__(self, x):
    x = nnx.relu(self.norm(spatial_conv(self.conv, x)))
    if self.pool:
      x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class DenseNet(nnx.Module):
  """DenseNet-BC (Huang et al., 2017) with torchvision's layout.

  Args:
    growth_rate: channels each dense layer adds (k).
    block_config: number of dense layers in each dense block.
    num_init_features: channels out of the stem.
    bn_size: bottleneck width multiplier (the 1x1 conv has ``bn_size * k`` channels).
    compression: channel reduction of each transition (0.5 for DenseNet-BC).
    in_channels: image channels (3 for ImageNet/CheXNet weights, 1 for grayscale).
    num_classes: outputs of the classifier.
    stem_kernel, stem_stride, stem_pool: the stem's conv kernel and stride, and
      whether a 3x3/2 max pool follows (torchvision: 7, 2, True).
    dtype: computation dtype (parameters are always float32).
    rngs: ``nnx.Rngs`` for initialisation.
  """

  # Traced construction (nnx.eval_shape, jit) stays linear in depth: _tracing.
  @short_sharding_errors()
  def __init__(
      self,
      *,
      growth_rate: int = 32,
      block_config: Sequence[int] = (6, 12, 24, 16),
      num_init_features: int = 64,
      bn_size: int = 4,
      compression: float = 0.5,
      in_channels: int = 3,
      num_classes: int = 1000,
      stem_kernel: int = 7,
      stem_stride: int = 2,
      stem_pool: bool = True,
      dtype=jnp.float32,
      rngs: nnx.Rngs,
  ):
    if not 0.0 < compression <= 1.0:
      raise ValueError(f"compression must be in (0, 1], got {compression}.")
    if not block_config:
      raise ValueError("block_config must name at least one dense block.")
    self.dtype = dtype
    self.stem = Stem(
        in_channels, num_init_features, kernel=stem_kernel, stride=stem_stride,
        pool=stem_pool, dtype=dtype, rngs=rngs,
    )
    features = num_init_features
    blocks, transitions = [], []
    for i, num_layers in enumerate(block_config):
      blocks.append(DenseBlock(
          features, num_layers=num_layers, growth_rate=growth_rate, bn_size=bn_size,
          dtype=dtype, rngs=rngs,
      ))
      features += num_layers * growth_rate
      if i != len(block_config) - 1:
        out = int(features * compression)
        transitions.append(Transition(features, out, dtype=dtype, rngs=rngs))
        features = out
    self.blocks = nnx.List(blocks)
    self.transitions = nnx.List(transitions)
    self.final_norm = _batch_norm(features, dtype=dtype, rngs=rngs)
    self.classifier = nnx.Linear(
        features, num_classes, kernel_init=initializers.lecun_normal(),
        bias_init=nnx.initializers.zeros, dtype=dtype, rngs=rngs
    )
    self.num_features = features
    self.in_channels = in_channels
    self.num_classes = num_classes
    names = ["stem"]
    for i in range(len(block_config)):
      names.append(f"block{i + 1}")
      if i != len(block_config) - 1:
        names.append(f"transition{i + 1}")
    self.stage_names = tuple(names)

  # --- stages -------------------------------------------------------------------

  def _stage(self, name: str):
    if name == "stem":
      return self.stem
    kind, index = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):] or 0)
    return (self.blocks if kind == "block" else self.transitions)[index - 1]

  def stage_index(self, stage: str) -> int:
    if stage not in self.stage_names:
      raise ValueError(
          f"Unknown stage {stage!r}; valid stages are {list(self.stage_names)}."
      )
    return self.stage_names.index(stage)

  def smallest_input(self) -> int:
    """The smallest image side the network maps to a feature map of at least 1 x 1."""
    conv = self.stem.conv

    def final(n):
      n = (n + 2 * conv.padding[0][0] - conv.kernel_size[0]) // conv.strides[0] + 1
      n = (n + 2 - 3) // 2 + 1 if self.stem.pool else n
      for _ in self.transitions:
        n = n // 2
      return n

    return next(n for n in range(1, 4097) if final(n) >= 1)

  def check_input(self, x) -> None:
    """Raises ``ValueError`` for images this network cannot take: not ``(n, h, w, c)``,
    another channel count, or smaller than ``smallest_input()`` (whose feature map
    would be empty, and every effect NaN). Shapes are static, so this holds under
    ``jit`` too."""
    if x.ndim != 4:
      raise ValueError(f"images must be (n, h, w, c), got shape {x.shape}.")
    if x.shape[-1] != self.in_channels:
      raise ValueError(f"The network takes {self.in_channels}-channel images, got "
                       f"{x.shape[-1]} channels (shape {x.shape}).")
    side = self.smallest_input()
    if min(x.shape[1:3]) < side:
      raise ValueError(f"Images of {x.shape[1]} x {x.shape[2]} are too small for this "
                       f"network: it needs at least {side} x {side} pixels.")

  def forward_to(self, x: jax.Array, stage: str) -> jax.Array:
    """The prefix: runs the stem through ``stage`` (inclusive), returns its output."""
    end = self.stage_index(stage)
    self.check_input(x)
    x = x.astype(self.dtype)
    for name in self.stage_names[: end + 1]:
      x = self._stage(name)(x)
    return x

  def forward_from(self, h: jax.Array, stage: str) -> jax.Array:
    """The suffix: takes the output of ``stage`` and returns the logits."""
    start = self.stage_index(stage)
    for name in self.stage_names[start + 1:]:
      h = self._stage(name)(h)
    return self.head(h)

  def feature_map(self, h: jax.Array) -> jax.Array:
    """Final BN + ReLU on the last block's output: the map CAMs are built from."""
    return nnx.relu(self.final_norm(h))

  def classify(self, features: jax.Array) -> jax.Array:
    """Global average pooling and the linear classifier, on a feature map."""
    return self.classifier(jnp.mean(features, axis=(1, 2))).astype(jnp.float32)

  def head(self, h: jax.Array) -> jax.Array:
    return self.classify(self.feature_map(h))

  def features(self, x: jax.Array) -> jax.Array:
    """The last feature map before global pooling, shape (n, h', w', num_features)."""
    return self.feature_map(self.forward_to(x, self.stage_names[-1]))

  # A traced training step assigns every BatchNorm's statistics: see _tracing.
  @short_sharding_errors()
  def __call__(self, x: jax.Array) -> jax.Array:
    return self.classify(self.features(x))


# torchvision's presets (Huang et al. 2017, table 1).
DenseNet121 = functools.partial(
    DenseNet, growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64
)
DenseNet169 = functools.partial(
    DenseNet, growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64
)
DenseNet201 = functools.partial(
    DenseNet, growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64
)
# Small enough to train on a 2-core CPU in minutes; for tests and the demo.
DenseNetTiny = functools.partial(
    DenseNet, growth_rate=12, block_config=(3, 3, 3), num_init_features=24,
    stem_kernel=7, stem_stride=2, stem_pool=True,
)

PRESETS = {
    "densenet121": DenseNet121,
    "densenet169": DenseNet169,
    "densenet201": DenseNet201,
    "tiny": DenseNetTiny,
}


def create_densenet(preset: str, *, rngs: nnx.Rngs, **overrides) -> DenseNet:
  """Builds a preset by name; ``overrides`` replace any constructor argument."""
  if preset not in PRESETS:
    raise ValueError(f"Unknown model preset {preset!r}; valid presets are {sorted(PRESETS)}.")
  return PRESETS[preset](rngs=rngs, **overrides)


def count_params(model: nnx.Module) -> int:
  """Trainable parameters (BatchNorm statistics excluded, like torch's parameters())."""
  state = nnx.state(model, nnx.Param)
  return sum(x.size for x in jax.tree.leaves(state))
