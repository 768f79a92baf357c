"""Import PyTorch DenseNet weights (torchvision and CheXNet layouts) into cejax.

Reads a checkpoint in any of the layouts found in the wild:

* a torchvision ``state_dict`` (``features.denseblock1.denselayer1.norm1.weight``);
* a CheXNet training checkpoint, ``{"state_dict": ...}`` with keys prefixed
  ``module.densenet121.``, the torch<0.4 layer names ``norm.1``/``conv.1``/``norm.2``/
  ``conv.2`` and the head ``classifier.0`` (``Linear`` then ``Sigmoid``);
* a pickled whole model, ``{"model": <nn.Module>}`` (jrzech/reproduce-chexnet);
* the same tensors as ``.npz`` or ``.safetensors`` (torchvision names), which need no
  PyTorch.

The architecture (growth rate, block sizes, channels, classes) is read from the
tensor shapes. Every tensor must be used and every parameter filled: a mismatch is a
``ValueError`` listing the keys, never a partial load.

Command line (writes a workdir that ``analyze.py`` and ``load_logits_fn`` read)::

    python -m cejax.jobs.convert --input=m-25012018-123527.pth.tar --workdir=runs/chexnet \\
        --preset=chexnet
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cejax.jobs import checkpoint
from cejax.models import densenet

# CheXNet's class order (Wang et al. 2017; arnoweng, zoogzog, jrzech).
CHEXNET_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
    "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
    "Pleural_Thickening", "Hernia",
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Wrappers to strip: DataParallel's ``module.``, CheXNet's ``densenet121.`` attribute.
_PREFIX = re.compile(r"^(module\.|model\.|densenet\d+\.)+")
# torch<0.4 dense layers were nn.Sequential children named "norm.1", "conv.2", ...
_OLD_LAYER = re.compile(r"\.(norm|relu|conv)\.(\d)\.")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    return value.detach().cpu().float().numpy() if value.is_floating_point() \
        else value.detach().cpu().numpy()
  return np.asarray(value)


def _read_torch(path: Path, *, trust_pickle: bool):
  try:
    import torch
  except ImportError as e:
    raise ImportError(
        f"Reading {path.name} needs PyTorch: pip install 'cejax[torch]' (or convert the "
        "weights to .npz/.safetensors with torchvision names).") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
  except Exception as e:  # torch raises UnpicklingError or RuntimeError here
    if trust_pickle:
      raise ValueError(f"Could not read {path} with torch.load: {e}") from e
    raise ValueError(
        f"{path} is not a plain weights file (torch.load(weights_only=True) failed: "
        f"{str(e).splitlines()[0]}). It may hold a pickled whole model, which runs code "
        "when loaded: if you trust the file, pass trust_pickle=True (--trust_pickle).") from e


def _unwrap(obj, path: Path) -> Mapping[str, Any]:
  """The state dict inside the checkpoint layouts we know."""
  if hasattr(obj, "state_dict") and callable(obj.state_dict):  # a whole nn.Module
    return obj.state_dict()
  if isinstance(obj, Mapping):
    for key in ("state_dict", "model", "model_state_dict"):
      if key in obj:
        return _unwrap(obj[key], path)
    if obj and all(isinstance(k, str) for k in obj):
      return obj
  raise ValueError(
      f"{path} holds a {type(obj).__name__} with no DenseNet weights; expected a "
      "state dict, {'state_dict': ...}, {'model': nn.Module} or an nn.Module.")


def read_state_dict(path, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a checkpoint into ``{torch key: float32/int array}``, keys unchanged.

  Args:
    path: ``.pth``/``.pth.tar``/``.pt``/``.bin`` (PyTorch), ``.npz`` or
      ``.safetensors``.
    trust_pickle: allow unpickling arbitrary objects (needed for whole-model
      checkpoints; only for files you trust).

  Raises:
    FileNotFoundError: no such file. ValueError: not a weights file we understand.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Checkpoint {path} does not exist.")
  if path.suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    return dict(load_file(str(path)))
  state = _unwrap(_read_torch(path, trust_pickle=trust_pickle), path)
  return {k: _to_numpy(v) for k, v in state.items()}


def canonical_key(key: str) -> str | None:
  """torchvision's name for a key of any known layout; None for keys we ignore."""
  key = _PREFIX.sub("", key)
  key = _OLD_LAYER.sub(lambda m: f".{m.group(1)}{m.group(2)}.", key)
  key = key.replace("classifier.0.", "classifier.")  # Sequential(Linear, Sigmoid)
  if key.endswith("num_batches_tracked"):
    return None
  return key


def canonicalize(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames every key to torchvision's layout.

  Raises:
    ValueError: two keys map to the same name.
  """
  out, source = {}, {}
  for key, value in state.items():
    name = canonical_key(key)
    if name is None:
      continue
    if name in out:
      raise ValueError(f"Keys {source[name]!r} and {key!r} both map to {name!r}.")
    out[name], source[name] = value, key
  return out


def infer_architecture(state: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Reads the DenseNet's shape from a canonical state dict.

  Returns:
    ``{"preset", "overrides", "num_classes", "in_channels"}``: the matching preset
    in ``densenet.PRESETS`` (``overrides`` empty), or ``densenet121`` with the
    differing constructor arguments as ``overrides``.

  Raises:
    ValueError: the tensors are not a DenseNet in torchvision's layout.
  """
  needed = ["features.conv0.weight", "classifier.weight"]
  missing = [k for k in needed if k not in state]
  if missing:
    raise ValueError(f"Not a torchvision-layout DenseNet: missing {missing}; "
                     f"first keys are {sorted(state)[:5]}.")
  layers = {}
  for key in state:
    m = re.match(r"features\.denseblock(\d+)\.denselayer(\d+)\.", key)
    if m:
      b, layer = int(m.group(1)), int(m.group(2))
      layers[b] = max(layers.get(b, 0), layer)
  if not layers or sorted(layers) != list(range(1, len(layers) + 1)):
    raise ValueError(f"Dense blocks must be numbered 1..n; found {sorted(layers)}.")
  first = "features.denseblock1.denselayer1."
  conv0 = state["features.conv0.weight"]
  growth = int(state[first + "conv2.weight"].shape[0])
  arch = {
      "growth_rate": growth,
      "block_config": tuple(layers[b] for b in sorted(layers)),
      "num_init_features": int(conv0.shape[0]),
      "bn_size": int(state[first + "conv1.weight"].shape[0]) // growth,
      "stem_kernel": int(conv0.shape[-1]),
  }
  num_classes, in_channels = int(state["classifier.weight"].shape[0]), int(conv0.shape[1])
  defaults = {"bn_size": 4, "stem_kernel": 7}
  for name, preset in densenet.PRESETS.items():
    want = dict(defaults, **preset.keywords)
    if all(want.get(k) == v for k, v in arch.items()):
      return {"preset": name, "overrides": {}, "num_classes": num_classes,
              "in_channels": in_channels}
  base = dict(defaults, **densenet.PRESETS["densenet121"].keywords)
  overrides = {k: v for k, v in arch.items() if base.get(k) != v}
  overrides["block_config"] = list(arch["block_config"])  # JSON-friendly
  return {"preset": "densenet121", "overrides": overrides, "num_classes": num_classes,
          "in_channels": in_channels}


def torch_name(path: Sequence, *, num_blocks: int) -> str:
  """torchvision's key for one leaf of our params/batch_stats pure dicts."""
  *module, leaf = [p.key if hasattr(p, "key") else p for p in path]
  leaf = _LEAF_NAMES[leaf]
  match module:
    case ["stem", "conv"]:
      return f"features.conv0.{leaf}"
    case ["stem", "norm"]:
      return f"features.norm0.{leaf}"
    case ["blocks", b, "layers", l, name]:
      return f"features.denseblock{b + 1}.denselayer{l + 1}.{name}.{leaf}"
    case ["transitions", t, name]:
      return f"features.transition{t + 1}.{name}.{leaf}"
    case ["final_norm"]:
      return f"features.norm{num_blocks + 1}.{leaf}"
    case ["classifier"]:
      return f"classifier.{leaf}"
  raise ValueError(f"No torchvision name for parameter {module + [leaf]}.")


def _from_torch(array: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:  # conv (O, I, kh, kw) -> (kh, kw, I, O)
    return array.transpose(2, 3, 1, 0)
  if leaf == "kernel" and array.ndim == 2:  # linear (out, in) -> (in, out)
    return array.T
  return array


def load_into(model: densenet.DenseNet, state: Mapping[str, np.ndarray]):
  """Fills ``model``'s variables from a canonical state dict.

  Returns:
    ``(graphdef, params, batch_stats)`` with params and stats as pure dicts.

  Raises:
    ValueError: missing, unexpected or wrongly shaped tensors (all of them listed).
  """
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  num_blocks = len(model.blocks)
  used, missing, bad_shape = set(), [], []

  def fill(path, current):
    name = torch_name(path, num_blocks=num_blocks)
    if name not in state:
      missing.append(name)
      return current
    used.add(name)
    value = _from_torch(np.asarray(state[name], np.float32), path[-1].key)
    if value.shape != current.shape:
      bad_shape.append(f"{name}: checkpoint {tuple(state[name].shape)}, model expects "
                       f"{tuple(current.shape)} (in our layout)")
      return current
    return jnp.asarray(value, current.dtype)

  params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(params))
  stats = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(stats))
  unexpected = sorted(set(state) - used)
  if missing or unexpected or bad_shape:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing keys: {missing[:20]}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected keys: {unexpected[:20]}")
    if bad_shape:
      parts.append(f"{len(bad_shape)} shape mismatches: {bad_shape[:20]}")
    raise ValueError("Checkpoint does not match the DenseNet; nothing was loaded. "
                     + "; ".join(parts))
  return graphdef, params, stats


def import_densenet(source, *, trust_pickle: bool = False, dtype=jnp.float32):
  """Reads a PyTorch DenseNet checkpoint into our Flax DenseNet.

  Args:
    source: a checkpoint path (see ``read_state_dict``) or a state dict.
    trust_pickle: see ``read_state_dict``.
    dtype: compute dtype of the model.

  Returns:
    ``(graphdef, params, batch_stats, arch)``; ``arch`` as ``infer_architecture``.
  """
  state = source if isinstance(source, Mapping) else read_state_dict(
      source, trust_pickle=trust_pickle)
  state = canonicalize({k: _to_numpy(v) for k, v in state.items()})
  arch = infer_architecture(state)
  run = dict(arch, dtype=jnp.dtype(dtype).name)
  model = checkpoint.abstract_model(run)
  model.eval()
  graphdef, params, stats = load_into(model, state)
  return graphdef, params, stats, arch


# Preprocessing and output conventions of the checkpoints users bring.
PROFILES = {
    # CheXNet (arnoweng, zoogzog, jrzech): sigmoid per finding, ImageNet normalization.
    "chexnet": dict(class_names=CHEXNET_CLASSES, multi_label=True, mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, image_size=224),
    # The paper's own code puts a softmax on CheXNet's 14 logits.
    "chexnet_softmax": dict(class_names=CHEXNET_CLASSES, multi_label=False,
                            mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=224),
    # torchvision ImageNet classifiers.
    "imagenet": dict(class_names=None, multi_label=False, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, image_size=224),
}


def convert(source, workdir, *, profile: str = "chexnet", trust_pickle: bool = False,
            class_names: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes a PyTorch DenseNet checkpoint as a cejax workdir (run.json + Orbax step 0).

  Args:
    source: checkpoint path or state dict.
    workdir: output directory; must not already hold a checkpoint.
    profile: output activation and preprocessing, one of ``PROFILES``.
    trust_pickle: see ``read_state_dict``.
    class_names: overrides the profile's class names.

  Returns:
    The run.json dict written.
  """
  if profile not in PROFILES:
    raise ValueError(f"Unknown profile {profile!r}; valid are {sorted(PROFILES)}.")
  workdir = Path(workdir)
  if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
    raise ValueError(f"{workdir} already holds checkpoints; use a new --workdir.")
  _, params, stats, arch = import_densenet(source, trust_pickle=trust_pickle)
  settings = dict(PROFILES[profile])
  names = class_names or settings.pop("class_names") or [
      f"class_{i}" for i in range(arch["num_classes"])]
  if len(names) != arch["num_classes"]:
    raise ValueError(f"{len(names)} class names for a {arch['num_classes']}-class head.")
  if len(settings["mean"]) != arch["in_channels"]:
    raise ValueError(f"Profile {profile!r} normalizes {len(settings['mean'])} channels "
                     f"but the model takes {arch['in_channels']}.")
  run = dict(arch, dtype="float32", class_names=list(names), best_metric=None,
             mean=list(settings["mean"]), std=list(settings["std"]),
             multi_label=settings["multi_label"], image_size=settings["image_size"],
             source=str(source) if not isinstance(source, Mapping) else "state dict",
             profile=profile)
  checkpoint.check_or_write_run(workdir, run)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  try:
    ckpt.save(0, {"step": 0, "params": params, "batch_stats": stats})
  finally:
    ckpt.close()
  return run


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m cejax.jobs.convert", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--input", required=True, help=".pth/.pth.tar/.pt/.npz/.safetensors")
  p.add_argument("--workdir", required=True)
  p.add_argument("--profile", default="chexnet", choices=sorted(PROFILES))
  p.add_argument("--trust_pickle", action="store_true",
                 help="allow whole-model pickles (runs code from the file)")
  args = p.parse_args(argv)
  run = convert(args.input, args.workdir, profile=args.profile,
                trust_pickle=args.trust_pickle)
  print(f"Wrote {args.workdir}: {run['preset']} {run['overrides'] or ''}"
        f"{run['num_classes']} classes, {run['in_channels']} channels, "
        f"{'sigmoid' if run['multi_label'] else 'softmax'} outputs.")


if __name__ == "__main__":
  main()
