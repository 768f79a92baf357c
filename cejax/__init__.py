"""cejax: causal effects of interventions on images and features, in JAX.

The library, one name per line (Optax's style). Each name has one public home: its
module (``cejax.masks.grid``) and, for the names below, this package
(``cejax.grid``). Modules whose names start with ``_`` are private.

- ``cejax.effects``: the engine (``causal_effect`` for every forward path, ``ce_map``);
- ``cejax.masks``, ``cejax.interventions``, ``cejax.estimands``: what is intervened on,
  with what, and how the effect is measured;
- ``cejax.incremental``, ``cejax.latent``: forward paths beside full forward passes;
- ``cejax.precision``: the precision policy (exact float32 products by default);
- ``cejax.saliency``, ``cejax.attacks``, ``cejax.defenses``, ``cejax.metrics``,
  ``cejax.filters``, ``cejax.sharding``, ``cejax.adapters``, ``cejax.types``,
  ``cejax.models``, ``cejax.autoencoder``.

The jobs (training, checkpoints, analysis, sweep, weight import) live in ``cejax.jobs``
and are imported on their own: ``import cejax`` imports no Orbax, TFDS or matplotlib.
``cejax.load_logits_fn`` loads ``cejax.jobs.checkpoint`` when first used.
"""

from cejax._deprecation import Lazy as _Lazy
from cejax._deprecation import deprecated_names as _deprecated_names
from cejax._deprecation import install as _install

_install()  # old module paths (cejax.sweep, ...) for one release

from cejax import adapters as adapters  # noqa: E402
from cejax import attacks as attacks  # noqa: E402
from cejax import defenses as defenses  # noqa: E402
from cejax import effects as effects  # noqa: E402
from cejax import estimands as estimands  # noqa: E402
from cejax import filters as filters  # noqa: E402
from cejax import incremental as incremental  # noqa: E402
from cejax import interventions as interventions  # noqa: E402
from cejax import latent as latent  # noqa: E402
from cejax import masks as masks  # noqa: E402
from cejax import metrics as metrics  # noqa: E402
from cejax import precision as precision  # noqa: E402
from cejax import saliency as saliency  # noqa: E402
from cejax import sharding as sharding  # noqa: E402
from cejax import types as types  # noqa: E402
from cejax.attacks import AttackResult as AttackResult  # noqa: E402
from cejax.attacks import PixelSpace as PixelSpace  # noqa: E402
from cejax.effects import CEResult as CEResult  # noqa: E402
from cejax.effects import Forward as Forward  # noqa: E402
from cejax.effects import FullForward as FullForward  # noqa: E402
from cejax.effects import causal_effect as causal_effect  # noqa: E402
from cejax.effects import ce_map as ce_map  # noqa: E402
from cejax.estimands import ACTIVATIONS as ACTIVATIONS  # noqa: E402
from cejax.estimands import ESTIMANDS as ESTIMANDS  # noqa: E402
from cejax.estimands import Estimand as Estimand  # noqa: E402
from cejax.estimands import activate as activate  # noqa: E402
from cejax.interventions import INTERVENTIONS as INTERVENTIONS  # noqa: E402
from cejax.interventions import Blur as Blur  # noqa: E402
from cejax.interventions import Constant as Constant  # noqa: E402
from cejax.interventions import GaussianNoise as GaussianNoise  # noqa: E402
from cejax.interventions import ImageMean as ImageMean  # noqa: E402
from cejax.interventions import ImageSet as ImageSet  # noqa: E402
from cejax.interventions import Intervention as Intervention  # noqa: E402
from cejax.interventions import Reference as Reference  # noqa: E402
from cejax.interventions import intervene as intervene  # noqa: E402
from cejax.latent import LatentInterventions as LatentInterventions  # noqa: E402
from cejax.latent import latent_interventions as latent_interventions  # noqa: E402
from cejax.masks import ArrayMasks as ArrayMasks  # noqa: E402
from cejax.masks import Boxes as Boxes  # noqa: E402
from cejax.masks import Grid as Grid  # noqa: E402
from cejax.masks import MaskSource as MaskSource  # noqa: E402
from cejax.masks import RiseMasks as RiseMasks  # noqa: E402
from cejax.masks import SlidingWindows as SlidingWindows  # noqa: E402
from cejax.masks import boxes as boxes  # noqa: E402
from cejax.masks import grid as grid  # noqa: E402
from cejax.masks import rise as rise  # noqa: E402
from cejax.masks import sliding_windows as sliding_windows  # noqa: E402
from cejax.masks import to_array as to_array  # noqa: E402
from cejax.sharding import mask_mesh as mask_mesh  # noqa: E402


def _load_logits_fn(*args, **kwargs):
  from cejax.jobs.checkpoint import load_logits_fn

  return load_logits_fn(*args, **kwargs)


_load_logits_fn.__doc__ = """``cejax.jobs.checkpoint.load_logits_fn``: the trained model of a
workdir as a pure ``images -> logits`` function, and its run description."""


def _old_latent_causal_effect(prefix_fn, suffix_fn, image, interventions_, **kwargs):
  return causal_effect(latent.forward(prefix_fn, suffix_fn), image, interventions_, **kwargs)


def _old_compile_once(*, static_argnames, validate=None):
  import inspect

  from cejax._compile import jit

  def wrap(fn):
    names = [n for n in inspect.signature(fn).parameters if n not in static_argnames]

    def prepare(arguments):
      if validate is not None:
        validate(arguments)
      return arguments

    return jit(fn, data=names, prepare=prepare)

  return wrap


def __getattr__(name):
  if name == "load_logits_fn":
    return _load_logits_fn
  return _old(name)


_old = _deprecated_names(__name__, {
    "checkpoint": ("cejax.jobs.checkpoint", _Lazy("cejax.jobs.checkpoint")),
    "compile_once": ("cejax._compile.jit (internal); jax.jit for your own functions",
                     _old_compile_once),
    "grid_masks": ("cejax.to_array(cejax.grid(...))", _Lazy("cejax.masks",
                                                                       "grid_masks")),
    "sliding_window_masks": ("cejax.to_array(cejax.sliding_windows(...))",
                             _Lazy("cejax.masks", "sliding_window_masks")),
    "box_masks": ("cejax.to_array(cejax.boxes(...))",
                  _Lazy("cejax.masks", "box_masks")),
    "rise_masks": ("cejax.rise", rise),
    "latent_causal_effect": ("cejax.causal_effect(cejax.latent.forward(prefix_fn, "
                             "suffix_fn), ...)", _old_latent_causal_effect),
})

__all__ = (
    "ACTIVATIONS",
    "ArrayMasks",
    "AttackResult",
    "Blur",
    "Boxes",
    "CEResult",
    "Constant",
    "ESTIMANDS",
    "Estimand",
    "Forward",
    "FullForward",
    "GaussianNoise",
    "Grid",
    "INTERVENTIONS",
    "ImageMean",
    "ImageSet",
    "Intervention",
    "LatentInterventions",
    "MaskSource",
    "PixelSpace",
    "Reference",
    "RiseMasks",
    "SlidingWindows",
    "activate",
    "adapters",
    "attacks",
    "boxes",
    "causal_effect",
    "ce_map",
    "defenses",
    "effects",
    "estimands",
    "filters",
    "grid",
    "incremental",
    "intervene",
    "interventions",
    "latent",
    "latent_interventions",
    "load_logits_fn",
    "mask_mesh",
    "masks",
    "metrics",
    "precision",
    "rise",
    "saliency",
    "sharding",
    "sliding_windows",
    "to_array",
    "types",
)
