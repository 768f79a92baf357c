"""Weight import from PyTorch, checked against PyTorch itself.

The reference network (``torch_densenet.py``) is torchvision's DenseNet written out
in plain PyTorch, so the test needs only ``torch``, not torchvision.
"""


import jax
import numpy as np
import pytest

from cejax.jobs import checkpoint, convert

torch = pytest.importorskip("torch")
from torch_densenet import TorchDenseNet, randomize  # noqa: E402
from torch_densenet import tiny as _tiny  # noqa: E402


def _chexnet_layout(state):
  """zoogzog/arnoweng CheXNet keys: DataParallel prefix, torch<0.4 names, Sequential head."""
  out = {}
  for k, v in state.items():
    for new, old in (("norm1", "norm.1"), ("norm2", "norm.2"), ("conv1", "conv.1"),
                     ("conv2", "conv.2")):
      k = k.replace(f".{new}.", f".{old}.")
    k = k.replace("classifier.", "classifier.0.")
    out["module.densenet121." + k] = v
  return out


def _jax_logits(graphdef, params, stats, x_nchw):
  x = jax.numpy.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))
  # Compiled as one program: op by op, DenseNet-121 compiles each layer's ops one at a
  # time (7x the CPU time). test_densenet checks that eager and jit logits agree.
  return np.asarray(jax.jit(checkpoint.make_logits_fn(graphdef, params, stats))(x))


@pytest.fixture(scope="module")
def densenet121():
  torch.manual_seed(0)
  model = randomize(TorchDenseNet(), 0)
  # 96 px: every layer runs (the last block at 3 x 3), at a fraction of 224's cost.
  x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref = model(x).numpy()
  return model, x, ref


def test_densenet121_parity_with_pytorch(densenet121, tmp_path):
  model, x, ref = densenet121
  state = model.state_dict()
  torch.save(state, tmp_path / "torchvision.pth")
  graphdef, params, stats, arch = convert.import_densenet(tmp_path / "torchvision.pth")
  assert arch == {"preset": "densenet121", "overrides": {}, "num_classes": 14,
                  "in_channels": 3}
  got = _jax_logits(graphdef, params, stats, x)
  assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero outputs
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  # The CheXNet layout (DataParallel prefix, old names, Sequential head) imports to the
  # very same weights, so the forward pass above covers it too.
  torch.save({"epoch": 3, "state_dict": _chexnet_layout(state), "best_loss": 0.1},
             tmp_path / "chexnet.pth.tar")
  _, params2, stats2, arch2 = convert.import_densenet(tmp_path / "chexnet.pth.tar")
  assert arch2 == arch
  jax.tree.map(np.testing.assert_array_equal, (params2, stats2), (params, stats))


def test_tiny_formats_agree_and_whole_model_pickle_needs_trust(tmp_path):
  model = _tiny()
  x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = model(x).numpy()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  np.savez(tmp_path / "w.npz", **state)
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp_path / "w.safetensors")
  torch.save({"model": model, "best_loss": 0.2, "epoch": 1}, tmp_path / "whole.pth")
  with pytest.raises(ValueError, match="trust_pickle"):
    convert.import_densenet(tmp_path / "whole.pth")
  for name, kwargs in (("w.npz", {}), ("w.safetensors", {}),
                       ("whole.pth", {"trust_pickle": True})):
    graphdef, params, stats, arch = convert.import_densenet(tmp_path / name, **kwargs)
    assert arch["preset"] == "tiny" and arch["num_classes"] == 5
    np.testing.assert_allclose(_jax_logits(graphdef, params, stats, x), ref, atol=1e-5)


def test_mismatched_keys_are_listed_and_nothing_loads(tmp_path):
  state = dict(_tiny().state_dict())
  del state["features.denseblock2.denselayer1.conv1.weight"]
  state["features.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as err:
    convert.import_densenet(state)
  msg = str(err.value)
  assert "features.denseblock2.denselayer1.conv1.weight" in msg
  assert "features.extra.weight" in msg and "nothing was loaded" in msg
  state = dict(_tiny().state_dict())
  state["features.norm0.weight"] = torch.zeros(7)
  with pytest.raises(ValueError, match="features.norm0.weight: checkpoint"):
    convert.import_densenet(state)
  with pytest.raises(ValueError, match="Not a torchvision-layout DenseNet"):
    convert.import_densenet({"fc.weight": torch.zeros(2, 2)})
  with pytest.raises(FileNotFoundError):
    convert.import_densenet(tmp_path / "missing.pth")


def test_non_preset_architecture_becomes_overrides():
  torch.manual_seed(0)
  model = randomize(TorchDenseNet(growth=8, blocks=(2, 2), init=16, bn_size=2, classes=3,
                                   in_channels=1), 0)
  x = torch.randn(1, 1, 32, 32)
  with torch.no_grad():
    ref = model(x).numpy()
  graphdef, params, stats, arch = convert.import_densenet(model.state_dict())
  assert arch["overrides"] == {"growth_rate": 8, "block_config": [2, 2],
                               "num_init_features": 16, "bn_size": 2}
  np.testing.assert_allclose(_jax_logits(graphdef, params, stats, x), ref, atol=1e-5)


def test_convert_command_writes_a_workdir_that_loads(tmp_path):
  model = _tiny(classes=14, in_channels=3)
  state = _chexnet_layout(model.state_dict())
  torch.save({"state_dict": state}, tmp_path / "m.pth.tar")
  workdir = tmp_path / "run"
  convert.main(["--input", str(tmp_path / "m.pth.tar"), "--workdir", str(workdir)])
  with pytest.raises(ValueError, match="already holds checkpoints"):
    convert.convert(tmp_path / "m.pth.tar", workdir)
  logits_fn, run = checkpoint.load_logits_fn(workdir)
  assert run["preset"] == "tiny" and run["multi_label"] is True and run["step"] == 0
  assert run["class_names"][1] == "Cardiomegaly"
  x = torch.randn(2, 3, 64, 64)
  with torch.no_grad():
    ref = model(x).numpy()
  got = np.asarray(logits_fn(jax.numpy.asarray(x.numpy().transpose(0, 2, 3, 1))))
  np.testing.assert_allclose(got, ref, atol=1e-5)
  # The CheXNet profile expects 14 classes; a 5-class head is refused.
  torch.save(_tiny().state_dict(), tmp_path / "five.pth")
  with pytest.raises(ValueError, match="5-class head"):
    convert.convert(tmp_path / "five.pth", tmp_path / "run2", profile="chexnet")


@pytest.mark.heavy
def test_imported_chexnet_layout_analyzes_real_chestxray14_images(tmp_path, chestxray_dir):
  """Smoke test on the real NIH images: a CheXNet-layout checkpoint (random weights,
  tiny architecture for speed) converted and analyzed with CheXNet preprocessing."""
  import json
  import subprocess
  import sys

  from conftest import ROOT

  net = _tiny(classes=14, in_channels=3, blocks=(2, 2))  # two blocks: less to compile
  torch.save({"state_dict": _chexnet_layout(net.state_dict())}, tmp_path / "chexnet.pth.tar")
  workdir = tmp_path / "run"
  convert.main(["--input", str(tmp_path / "chexnet.pth.tar"), "--workdir", str(workdir)])
  cmd = [sys.executable, str(ROOT / "analyze.py"), "--config=configs/chexnet.py",
         f"--workdir={workdir}", f"--config.data.manual_dir={chestxray_dir}",
         f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.data.image_size=72",
         "--config.data.crop_size=64", "--config.analysis.num_images=4",
         "--config.analysis.chunk_size=4", "--config.masks.grid_cells=4",
         "--config.masks.rise_masks=16", "--config.analysis.noise_samples=2",
         "--config.analysis.ig_steps=2", "--config.analysis.deletion_step=25088",
         "--config.analysis.attack_steps=2", "--config.analysis.defenses=()",
         "--config.analysis.epsilons=(0.01,)", "--config.analysis.attacks=('fgsm',)",
         "--config.analysis.methods=('ce_grid', 'grad_cam')",
         "--config.analysis.evaluators=('maps', 'localization')"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "analysis" / "metrics.json").read_text())
  assert summary["num_images"] == 4 and summary["num_with_box"] >= 1
  assert set(summary["methods"]) == {"ce_grid", "grad_cam", "chance_noise", "chance_center",
                                     "chance_box"}
  for row in summary["methods"].values():
    assert 0 <= row["pointing"][0] <= 1 and 0 <= row["deletion_zero"][0] <= 1
  run = json.loads((workdir / "run.json").read_text())
  assert run["multi_label"] and run["mean"] == list(convert.IMAGENET_MEAN)
