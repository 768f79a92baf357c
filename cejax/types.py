"""Shape-annotated names for the arrays and functions that recur across cejax.

Dimension names: ``n`` images, ``h w`` image height and width, ``c`` channels,
``m`` masks or interventions, ``k`` classes (or findings), ``b`` a chunk of masks.
Images are NHWC, in the model's input space unless a name says pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

import jax
from jaxtyping import Array, Bool, Float, Int

Image: TypeAlias = Float[Array, "h w c"]
Images: TypeAlias = Float[Array, "n h w c"]
Pixels: TypeAlias = Float[Array, "n h w c"]  # in [space.low, space.high]
Masks: TypeAlias = Float[Array, "m h w"]  # 1 = intervene, 0 = keep
Maps: TypeAlias = Float[Array, "n h w"]  # larger = more important
BoxMasks: TypeAlias = Bool[Array, "n h w"]
Logits: TypeAlias = Float[Array, "n k"]
Targets: TypeAlias = Int[Array, " n"]
Effects: TypeAlias = Float[Array, " m"] | Float[Array, "m k"]
PRNGKey: TypeAlias = jax.Array

# A model as cejax sees it: a pure function of normalised images.
LogitsFn: TypeAlias = Callable[[Images], Logits]
# The model split at its last feature map (the CAM family).
FeaturesFn: TypeAlias = Callable[[Images], Float[Array, "n h2 w2 f"]]
ClassifyFn: TypeAlias = Callable[[Float[Array, "n h2 w2 f"]], Logits]
