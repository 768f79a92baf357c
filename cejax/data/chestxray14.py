"""TFDS builder for NIH ChestX-ray14 (manual download).

Images are resized to a square of ``image_size`` pixels and stored as grayscale
uint8 (RGBA and RGB files are converted). Labels are the 14 findings as a multi-hot
vector (``No Finding`` is all zeros). Boxes from ``BBox_List_2017.csv`` (1024-pixel
frame) are rescaled with the image to ``[x_min, y_min, x_max, y_max]`` pixels.

Only images present in the manual directory are included, so a partial download
(or a handful of sample images) builds a small but valid data set.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import logging
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule",
    "Pneumonia", "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis",
    "Pleural_Thickening", "Hernia",
)
# The box file spells two findings differently from the label file.
_BOX_ALIASES = {"Infiltrate": "Infiltration"}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download NIH ChestX-ray14 (https://nihcc.app.box.com/v/ChestXray-NIHCC) and place in
the manual directory (``--config.data.manual_dir=DIR``):

  DIR/images/*.png               the PNGs (the images_*/images/*.png folders of the
                                 NIH tarballs may also be kept as they are: every
                                 *.png below DIR is found)
  DIR/Data_Entry_2017.csv        labels; Data_Entry_2017_v2020.csv(.gz) also works
  DIR/BBox_List_2017.csv         boxes (optional: without it no boxes are stored)
  DIR/train_val_list.txt         official split (optional: without both lists a
  DIR/test_list.txt              patient-level split is made from the patient id)
"""

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ChestXray14Config(tfds.core.BuilderConfig):
  image_size: int = 256
  validation_fraction: float = 0.1  # of train_val patients, or of all patients
  test_fraction: float = 0.2  # only when the official lists are absent


def _find_one(root: Path, patterns) -> Path | None:
  for pattern in patterns:
    found = sorted(root.glob(pattern))
    if found:
      return found[0]
  return None


def _read_text(path: Path) -> str:
  data = path.read_bytes()
  return gzip.decompress(data).decode() if path.suffix == ".gz" else data.decode()


def read_labels(path: Path) -> dict[str, dict]:
  """``Data_Entry_2017*.csv``: image -> {labels (14,), patient}."""
  rows = {}
  for row in csv.DictReader(io.StringIO(_read_text(path))):
    names = row["Finding Labels"].split("|")
    labels = np.array([name in names for name in FINDINGS], np.float32)
    rows[row["Image Index"]] = {"labels": labels, "patient": row["Patient ID"]}
  return rows


def read_boxes(path: Path) -> dict[str, list[tuple[int, tuple[float, ...]]]]:
  """``BBox_List_2017.csv``: image -> [(finding index, (x, y, w, h))] in 1024 px."""
  boxes: dict[str, list] = {}
  with open(path, newline="") as f:
    reader = csv.reader(f)
    next(reader)  # header: Image Index,Finding Label,Bbox [x,y,w,h],,,
    for row in reader:
      if not row:
        continue
      name = _BOX_ALIASES.get(row[1], row[1])
      if name not in FINDINGS:
        raise ValueError(f"{path}: unknown finding {row[1]!r} for {row[0]}.")
      boxes.setdefault(row[0], []).append(
          (FINDINGS.index(name), tuple(float(v) for v in row[2:6])))
  return boxes


def patient_split(patient: str, *, validation_fraction, test_fraction) -> str:
  """A split fixed by a hash of the patient id, so no patient spans two splits."""
  u = int(hashlib.sha256(patient.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  if u < test_fraction:
    return "test"
  if u < test_fraction + validation_fraction:
    return "validation"
  return "train"


def load_image(path: Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Grayscale uint8 ``(size, size, 1)`` and the original ``(width, height)``."""
  from PIL import Image  # pillow is a dependency of matplotlib; imported lazily

  with Image.open(path) as im:
    im.load()
    original = im.size
    im = im.convert("L").resize((size, size), Image.BILINEAR)
    return np.asarray(im, np.uint8)[..., None], original


def check_manual_dir(root: Path) -> tuple[Path, dict[str, Path]]:
  """The label file and ``{name: path}`` of the PNGs under ``root``.

  Raises:
    FileNotFoundError: naming each required file that is missing.
  """
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(
        f"ChestX-ray14 manual directory {root} is not a directory.\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS)
  entry = _find_one(root, ["Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz"])
  images = {p.name: p for p in sorted(root.rglob("*.png"))}
  missing = [what for what, ok in (("Data_Entry_2017*.csv(.gz)", entry),
                                   ("images/*.png", images)) if not ok]
  if missing:
    raise FileNotFoundError(
        f"ChestX-ray14 manual directory {root} lacks {', '.join(missing)}.\n"
        + MANUAL_DOWNLOAD_INSTRUCTIONS)
  return entry, images


class ChestXray14(tfds.core.GeneratorBasedBuilder):
  """NIH ChestX-ray14: 14 findings, multi-label, with boxes for 8 of them."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [ChestXray14Config(name="256px", image_size=256)]

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint8),
            "labels": tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.float32),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_labels": tfds.features.Tensor(shape=(None,), dtype=np.int64),
            "image_id": tfds.features.Text(),
            "patient": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    root = Path(dl_manager.manual_dir)
    splits = self._assign_splits(root)
    empty = [split for split, items in splits.items() if not items]
    if empty:  # TFDS cannot write an empty split; a partial download may have one
      _log.warning("ChestX-ray14 splits %s have no images and are left out.", empty)
    return {split: self._generate_examples(items)
            for split, items in splits.items() if items}

  def _assign_splits(self, root: Path) -> dict[str, list]:
    c = self.builder_config
    entry, images = check_manual_dir(root)
    labels = read_labels(entry)
    box_file = root / "BBox_List_2017.csv"
    boxes = read_boxes(box_file) if box_file.exists() else {}
    test_list = root / "test_list.txt"
    train_val_list = root / "train_val_list.txt"
    official = test_list.exists() and train_val_list.exists()
    test_names = set(test_list.read_text().split()) if official else set()
    splits = {"train": [], "validation": [], "test": []}
    unlabeled = 0
    for name, path in images.items():
      if name not in labels:
        unlabeled += 1
        continue
      patient = labels[name]["patient"]
      if official:
        split = "test" if name in test_names else patient_split(
            patient, validation_fraction=c.validation_fraction, test_fraction=0.0)
      else:
        split = patient_split(patient, validation_fraction=c.validation_fraction,
                              test_fraction=c.test_fraction)
      splits[split].append((name, path, labels[name], boxes.get(name, [])))
    if unlabeled:
      _log.warning("%d PNGs have no row in %s and were left out.", unlabeled, entry.name)
    return splits

  def _generate_examples(self, items):
    size = self.builder_config.image_size
    skipped = []
    for name, path, label, boxes in items:
      try:
        image, (width, height) = load_image(path, size)
      except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bad files
        skipped.append(f"{name} ({e})")
        continue
      # Boxes are given in the frame of the PNG; scale x and y with the resize.
      sx, sy = size / width, size / height
      xyxy = np.array([[x * sx, y * sy, (x + w) * sx, (y + h) * sy]
                       for _, (x, y, w, h) in boxes], np.float32).reshape(-1, 4)
      yield name, {
          "image": image,
          "labels": label["labels"],
          "boxes": xyxy,
          "box_labels": np.array([k for k, _ in boxes], np.int64),
          "image_id": name,
          "patient": label["patient"],
      }
    if skipped:
      _log.warning("Skipped %d unreadable images: %s", len(skipped), "; ".join(skipped))
      print(f"WARNING: skipped {len(skipped)} unreadable images: {'; '.join(skipped)}")
