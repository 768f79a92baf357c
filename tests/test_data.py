"""The TFDS builders and the input pipeline."""

import csv
import gzip
import io

import numpy as np
import pytest
from conftest import smoke_config
from PIL import Image

from cejax import data
from cejax.data import chestxray14


@pytest.fixture(scope="module")
def synthetic(data_dir):
  return data.load_dataset(smoke_config(data_dir).data)


def test_synthetic_builds_and_batches(synthetic):
  assert synthetic.num_examples("train") == 256
  assert synthetic.num_examples("validation") == 64
  batch = synthetic.batch("train", [0, 5, 7])
  assert batch["image"].shape == (3, 32, 32, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  # Normalization is (pixel / 255 - mean) / std with the config's mean and std.
  raw = synthetic.sources["train"][5]["image"].astype(np.float32) / 255
  np.testing.assert_allclose(batch["image"][1], (raw - 0.45) / 0.25, rtol=1e-6)
  has_box = batch["box_mask"][:, 0]
  np.testing.assert_array_equal(has_box, batch["label"] != 0)


def test_training_order_is_a_pure_function_of_seed_and_step():
  a = data.train_indices(100, batch_size=8, seed=1, step=13)
  b = data.train_indices(100, batch_size=8, seed=1, step=13)
  np.testing.assert_array_equal(a, b)
  # One epoch visits each example at most once (remainder dropped).
  epoch = np.concatenate([data.train_indices(100, batch_size=8, seed=1, step=s)
                          for s in range(12)])
  assert len(set(epoch.tolist())) == 96
  assert not np.array_equal(data.train_indices(100, batch_size=8, seed=1, step=12)[:8],
                            epoch[:8])


def test_eval_batches_pad_and_mark_valid(synthetic):
  batches = list(data.eval_batches(synthetic, "validation", batch_size=48))
  assert [b["valid"].sum() for b in batches] == [48, 16]
  assert all(b["image"].shape[0] == 48 for b in batches)


def test_unknown_dataset_lists_builtin_ones(data_dir):
  config = smoke_config(data_dir).data
  config.name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="synthetic, chestxray14"):
    data.load_dataset(config)


def test_dataset_by_tfds_name(data_dir, synthetic):
  """Any prepared TFDS data set loads by name (here: our own, registered by now)."""
  config = smoke_config(data_dir).data
  config.name = "cejax_synthetic/" + synthetic.sources["train"].dataset_info.config_name
  ds = data.load_dataset(config)
  np.testing.assert_array_equal(ds.batch("test", [1, 2])["image"],
                                synthetic.batch("test", [1, 2])["image"])
  assert ds.class_names == synthetic.class_names


# --- ChestX-ray14 ---------------------------------------------------------------

def _fake_layout(root, *, with_boxes=True):
  (root / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  rows = [("00000001_000.png", "Cardiomegaly", "1"),
          ("00000002_000.png", "No Finding", "2"),
          ("00000003_000.png", "Effusion|Mass", "3"),
          ("00000004_000.png", "Nodule", "4"),
          ("00000005_000.png", "Infiltration", "5")]
  for name, _, _ in rows[:3]:
    Image.fromarray(rng.integers(0, 255, (100, 100), dtype=np.uint8)).save(root / "images" / name)
  # An RGBA file (as some NIH PNGs are) and a truncated one.
  rgba = np.full((100, 100, 4), 255, np.uint8)
  rgba[..., :3] = 77
  Image.fromarray(rgba, "RGBA").save(root / "images" / rows[3][0])
  (root / "images" / rows[4][0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
  text = io.StringIO()
  w = csv.writer(text)
  w.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID"])
  for name, labels, patient in rows:
    w.writerow([name, labels, 0, patient])
  (root / "Data_Entry_2017_v2020.csv.gz").write_bytes(gzip.compress(text.getvalue().encode()))
  if with_boxes:
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "00000001_000.png,Cardiomegaly,10,20,30,40\n"
        "00000003_000.png,Mass,50,50,10,10\n"
        "00000003_000.png,Infiltrate,0,0,100,50\n")


def _cxr_config(tmp_path, manual_dir, size=50):
  from configs import chestxray14 as cxr_config

  config = cxr_config.get_config().data
  config.data_dir = str(tmp_path / "tfds")
  config.manual_dir = str(manual_dir)
  config.image_size = size
  config.crop_size = 0
  return config


def _all_examples(ds):
  out = {}
  for split, source in ds.sources.items():
    for i in range(len(source)):
      r = source[i]
      out[r["image_id"].decode() if isinstance(r["image_id"], bytes) else r["image_id"]] = (
          split, r, i)
  return out


def test_chestxray14_fake_layout(tmp_path, capsys):
  manual = tmp_path / "manual"
  _fake_layout(manual)
  ds = data.load_dataset(_cxr_config(tmp_path, manual))
  assert "skipped 1 unreadable images: 00000005_000.png" in capsys.readouterr().out
  examples = _all_examples(ds)
  assert set(examples) == {f"0000000{i}_000.png" for i in range(1, 5)}
  _, r, _ = examples["00000003_000.png"]
  labels = dict(zip(chestxray14.FINDINGS, r["labels"]))
  assert labels["Effusion"] == 1 and labels["Mass"] == 1 and sum(r["labels"]) == 2
  # 100 px original -> 50 px: boxes halve; "Infiltrate" maps to Infiltration.
  np.testing.assert_allclose(r["boxes"], [[25, 25, 30, 30], [0, 0, 50, 25]])
  assert [chestxray14.FINDINGS[k] for k in r["box_labels"]] == ["Mass", "Infiltration"]
  _, r, _ = examples["00000004_000.png"]
  assert r["image"].shape == (50, 50, 1) and int(r["image"].mean()) == 77  # RGBA -> L
  assert sum(examples["00000002_000.png"][1]["labels"]) == 0  # No Finding


def test_chestxray14_missing_files_say_which(tmp_path):
  manual = tmp_path / "empty"
  manual.mkdir()
  with pytest.raises(FileNotFoundError, match="Data_Entry_2017.*images/\\*.png"):
    data.load_dataset(_cxr_config(tmp_path, manual))
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data.load_dataset(_cxr_config(tmp_path, tmp_path / "nope"))


def test_chestxray14_real_samples(tmp_path, chestxray_dir):
  """The real NIH files: labels and rescaled boxes agree with images_index.csv."""
  size = 128
  ds = data.load_dataset(_cxr_config(tmp_path, chestxray_dir, size=size))
  examples = _all_examples(ds)
  index = list(csv.DictReader(open(chestxray_dir / "images_index.csv")))
  assert len(examples) == len({row["image"] for row in index}) == 22
  checked_boxes = 0
  for row in index:
    split, r, _ = examples[row["image"]]
    names = [chestxray14.FINDINGS[k] for k in np.flatnonzero(r["labels"])]
    expected = [] if row["data_entry_v2020_labels"] == "No Finding" else row["data_entry_v2020_labels"].split("|")
    assert sorted(names) == sorted(expected), row["image"]
    if row["bbox_finding"]:
      s = size / 1024
      x, y, w, h = (float(row[k]) for k in ("bbox_x", "bbox_y", "bbox_w", "bbox_h"))
      np.testing.assert_allclose(r["boxes"][0], [x * s, y * s, (x + w) * s, (y + h) * s],
                                 rtol=1e-5)
      finding = "Infiltration" if row["bbox_finding"] == "Infiltrate" else row["bbox_finding"]
      assert chestxray14.FINDINGS[r["box_labels"][0]] == finding
      checked_boxes += 1
  assert checked_boxes == 12
  # Preprocessed for a 3-channel ImageNet-normalized model, with a center crop.
  ds.crop_size = 112
  split, r, i = examples["00001369_000.png"]
  batch = ds.batch(split, [i])
  assert batch["image"].shape == (1, 112, 112, 3)
  np.testing.assert_allclose(batch["boxes"][0, 0], np.clip(r["boxes"][0] - 8, 0, 112))
