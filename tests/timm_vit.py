"""timm's ``VisionTransformer``, the reference of the ViT tests.

timm imports torchvision when it loads. Beside the CPU-only torch wheel of the test extra,
PyPI's torchvision cannot load its compiled operators ("operator torchvision::nms does
not exist"), so where ``import torchvision`` fails a stand-in module answers the names
timm imports at load time (transforms, datasets, a frozen BatchNorm); timm's
``VisionTransformer`` uses none of them. The model computed is timm's own code.
"""

import importlib
import sys
import types


class _Anything(type):
  """A class whose every attribute is another such class (``InterpolationMode.NEAREST``)."""

  def __getattr__(cls, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Anything(name, (), {})


class _StandIn(types.ModuleType):
  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    return _Anything(name, (), {})


def _stand_in_torchvision():
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]
  for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc",
               "torchvision.transforms", "torchvision.transforms.functional",
               "torchvision.transforms.v2", "torchvision.datasets", "torchvision.models",
               "torchvision.models.feature_extraction", "torchvision.io", "torchvision.utils"):
    module = _StandIn(name)
    module.__path__ = []  # a package, so that submodules import
    module.__version__ = "0.0"
    sys.modules[name] = module


def vision_transformer():
  """timm's ``VisionTransformer`` class."""
  try:
    importlib.import_module("torchvision")
  except Exception:  # noqa: BLE001  (RuntimeError for the operators, ImportError if absent)
    _stand_in_torchvision()
  from timm.models.vision_transformer import VisionTransformer

  return VisionTransformer


def randomised(*, num_classes: int = 5, in_chans: int = 3, seed: int = 0, **config):
  """timm's ``VisionTransformer`` of ``config`` in eval mode, every parameter moved by
  ``0.05 * N(0, 1)`` (timm zero-initialises the head and leaves ``cls_token`` near 0,
  which would hide differences in them)."""
  import torch

  torch.manual_seed(seed)
  model = vision_transformer()(num_classes=num_classes, in_chans=in_chans, **config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(0.05 * torch.randn_like(param))
  return model
