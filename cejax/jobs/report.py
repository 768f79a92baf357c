"""A self-contained HTML report (images embedded as PNG data URIs), and CSV tables."""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FIGURE_METHODS = ("ce_sliding", "ce_grid", "ce_sliding_token_drop", "ce_grid_token_drop",
                  "grad_cam", "grad_cam_pp", "smoothgrad", "integrated_gradients", "rise",
                  "attention_rollout", "transformer_attribution", "token_grad_cam")
TITLES = {
    "ce_sliding": "CE (sliding)", "ce_grid": "CE (grid)",
    "ce_rise": "CE (RISE masks)", "ce_latent": "latent CE", "gradient": "gradient",
    "gradient_x_input": "grad x input", "smoothgrad": "SmoothGrad",
    "integrated_gradients": "Integrated Grad.", "cam": "CAM", "grad_cam": "Grad-CAM",
    "grad_cam_pp": "Grad-CAM++", "smooth_grad_cam_pp": "Smooth Grad-CAM++",
    "rise": "RISE", "occlusion": "occlusion (= CE, target probability)",
    "extremal_perturbation": "extremal perturbations", "ce_optimal": "CE-optimal masks",
    "meaningful_perturbation": "meaningful perturbations",
    "chance_noise": "chance: uniform noise", "chance_center": "chance: centred Gaussian",
    "chance_box": "chance: random box of the mean box size",
    "ce_patches": "CE (patch subsets)",
    **{f"ce_{f}_{mode}": f"CE ({name}, {label})"
       for f, name in (("grid", "grid"), ("sliding", "sliding"), ("patches", "patch subsets"))
       for mode, label in (("token_drop", "token drop"), ("attention_mask", "attention mask"))},
    "attention_rollout": "attention rollout", "attention_relevance": "Chefer ICCV'21",
    "transformer_attribution": "Chefer CVPR'21 (LRP)", "token_grad_cam": "token Grad-CAM",
    "legrad": "LeGrad",
}
UNINFORMATIVE = "&dagger;"


def _png(fig) -> str:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _box_outline(ax, box):
  ys, xs = np.nonzero(box)
  if len(ys):
    ax.add_patch(plt.Rectangle((xs.min() - 0.5, ys.min() - 0.5), xs.max() - xs.min() + 1,
                               ys.max() - ys.min() + 1, fill=False, ec="lime", lw=1.5))


def _shown_images(inputs, num: int) -> np.ndarray:
  """The first ``num`` images with a box (the first ``num`` images if none has one)."""
  order = np.nonzero(inputs.has_box)[0][:num]
  return order if len(order) else np.arange(min(num, len(inputs.index)))


def figure_grid(inputs, maps, *, class_names, num: int = 6) -> str:
  """Per image: the image with its box, then each map (box outlined on every panel)."""
  order = _shown_images(inputs, num)
  methods = [m for m in FIGURE_METHODS if m in maps]
  if not methods:
    return ""
  fig, axes = plt.subplots(len(order), len(methods) + 1,
                           figsize=(1.9 * (len(methods) + 1), 2.35 * len(order)), squeeze=False)
  for r, i in enumerate(order):
    pix = inputs.pixels[i].astype(np.float32)
    img = pix[..., 0] if pix.shape[-1] == 1 else pix
    label = inputs.label[i]
    name = (class_names[int(label)] if np.ndim(label) == 0
            else ", ".join(class_names[j] for j in np.nonzero(label > 0.5)[0]) or "none")
    target = class_names[int(inputs.target[i])]
    axes[r, 0].imshow(img, cmap="gray", vmin=0, vmax=1)
    axes[r, 0].set_title(f"#{inputs.index[i]}: {name}\ntarget: {target}", fontsize=7)
    _box_outline(axes[r, 0], inputs.box[i])
    for c, m in enumerate(methods, start=1):
      axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1)
      axes[r, c].imshow(maps[m][i].astype(np.float32), cmap="jet", alpha=0.5)
      _box_outline(axes[r, c], inputs.box[i])
      if r == 0:
        axes[r, c].set_title(TITLES.get(m, m), fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([]), ax.set_yticks([])
  return _png(fig)


def histograms(effects) -> str:
  """Per-mask expected CE, clean vs each attack (pooled over images); ``effects`` is
  ``{"clean" or attack name: (n, masks)}``."""
  names = sorted(k for k in effects if k != "clean")
  if not names:
    return ""
  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
  clean = effects["clean"].astype(np.float32).ravel()
  for ax, name in zip(axes[0], names, strict=True):
    adv = effects[name].astype(np.float32).ravel()
    lo, hi = np.percentile(np.r_[clean, adv], [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 40)
    ax.hist(clean, bins=bins, alpha=0.6, density=True, label="clean")
    ax.hist(adv, bins=bins, alpha=0.6, density=True, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("per-mask expected CE", fontsize=8)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=7)
  return _png(fig)


def roc_figure(summary) -> str:
  detect = summary["detection"]
  if not detect:
    return ""
  fig, axes = plt.subplots(1, len(detect), figsize=(3.0 * len(detect), 2.9), squeeze=False)
  for ax, (attack, dets) in zip(axes[0], detect.items(), strict=True):
    for name, d in dets.items():
      if d["fpr"]:
        ax.plot(d["fpr"], d["tpr"], label=f"{name} ({d['auroc']:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_title(attack, fontsize=9)
    ax.set_xlabel("false-positive rate", fontsize=8)
    ax.set_ylabel("true-positive rate", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")
  return _png(fig)


def defended_figure(inputs, defended, *, num: int = 4) -> str:
  """Per image: each defended input and its grid CE map (box outlined)."""
  names = sorted(defended.maps)
  if not names:
    return ""
  order = _shown_images(inputs, num)
  fig, axes = plt.subplots(len(order), 2 * len(names) + 1,
                           figsize=(1.7 * (2 * len(names) + 1), 1.9 * len(order)),
                           squeeze=False)
  gray = lambda a: a[..., 0] if a.shape[-1] == 1 else a
  for r, i in enumerate(order):
    axes[r, 0].imshow(gray(inputs.pixels[i].astype(np.float32)), cmap="gray", vmin=0,
                      vmax=1)
    _box_outline(axes[r, 0], inputs.box[i])
    if r == 0:
      axes[r, 0].set_title("input", fontsize=8)
    for c, name in enumerate(names):
      pix = gray(defended.pixels[name][i].astype(np.float32))
      a, b = axes[r, 1 + 2 * c], axes[r, 2 + 2 * c]
      a.imshow(pix, cmap="gray", vmin=0, vmax=1)
      b.imshow(pix, cmap="gray", vmin=0, vmax=1)
      b.imshow(defended.maps[name][i].astype(np.float32), cmap="jet", alpha=0.5)
      _box_outline(b, inputs.box[i])
      if r == 0:
        a.set_title(name, fontsize=8)
        b.set_title(f"CE map, {name}", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([]), ax.set_yticks([])
  return _png(fig)


def _img(uri: str, caption: str = "") -> str:
  """An embedded figure, or nothing when there is nothing to draw."""
  if not uri:
    return ""
  return (f"<p class=note>{caption}</p>" if caption else "") + f"<img src='{uri}'>"


def _fmt(ci) -> str:
  mean, lo, hi = ci
  return "n/a" if not np.isfinite(mean) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def _level_cells(levels) -> str:
  """T(IoBB)/T(IoU) per level: means with intervals (older records: bare means)."""
  if not levels:
    return "n/a"
  return " / ".join(_fmt(v) if isinstance(v, (list, tuple)) else f"{v:.2f}" for v in levels)


def _marked(summary, metric, title: str) -> str:
  """A column title, marked where uniform noise is within the best method's interval."""
  flag = summary.get("uninformative", {}).get(metric)
  if isinstance(flag, list):
    flag = any(flag)
  return f"{title} {UNINFORMATIVE}" if flag else title


def metrics_table(summary) -> str:
  cols = ("pointing", "hit", "mass", "iou", "otsu_iou", "deletion_zero", "deletion_blur",
          "insertion_blur")
  rows = []
  for m, row in summary["methods"].items():
    if "pointing" not in row:
      continue
    cells = "".join(f"<td>{_fmt(row[c])}</td>" for c in cols)
    lists = [_level_cells(row.get(k)) for k in ("t_iobb", "t_iou")]
    sanity = _fmt(row["sanity_spearman"]) if "sanity_spearman" in row else "—"
    rows.append(f"<tr><th>{html.escape(TITLES.get(m, m))}</th>{cells}"
                + "".join(f"<td>{v}</td>" for v in lists) + f"<td>{sanity}</td></tr>")
  if not rows:
    return "<p>No localization results: the run's evaluators do not include it.</p>"
  titles = [("pointing", "pointing game &uarr;"), ("hit", "hit rate &uarr;"),
            ("mass", "mass in box &uarr;"), ("iou", "IoU at half range &uarr;"),
            ("otsu_iou", "Otsu mIoU (CheXlocalize) &uarr;"),
            ("deletion_zero", "deletion AUC, zero fill &darr;"),
            ("deletion_blur", "deletion AUC, blur fill &darr;"),
            ("insertion_blur", "insertion AUC, from blur &uarr;"),
            ("t_iobb", "T(IoBB) at " + ", ".join(map(str, summary.get("iobb_levels", ())))
             + " (Wang et al.)"),
            ("t_iou", "T(IoU) at " + ", ".join(map(str, summary.get("iou_thresholds", ()))))]
  head = ("<tr><th>method</th>"
          + "".join(f"<th>{_marked(summary, k, t)}</th>" for k, t in titles)
          + "<th>rank corr. with random model &darr;</th></tr>")
  note = ""
  if any(summary.get("uninformative", {}).values()):
    note = (f"<p class=note>{UNINFORMATIVE} Uninformative for these maps: uniform noise's "
            "95 % interval reaches the best method's, or noise scores better (at some level, "
            "for T(IoBB) and T(IoU)), so the column does not separate the methods from "
            "chance.</p>")
  dead = {m: row["dead_objective_share"] for m, row in summary["methods"].items()
          if row.get("dead_objective_share")}
  if dead:
    note += "".join(
        f"<p class=warn>{html.escape(TITLES.get(m, m))}: {100 * share:.0f} % of the "
        "optimised masks had a dead objective (its gradient below 1e-3 of the area "
        "term's at the first or last iteration): those masks are shaped by the area "
        "constraint, not by the model.</p>" for m, share in dead.items())
  return f"<table>{head}{''.join(rows)}</table>{note}"


def _auroc_cell(d) -> str:
  lo, hi = d.get("auroc_ci", (float("nan"), float("nan")))
  interval = f" [{lo:.3f}, {hi:.3f}]" if np.isfinite(lo) else ""
  return f"{d['auroc']:.3f}{interval}"


def detection_table(summary) -> str:
  rows = []
  for attack, dets in summary["detection"].items():
    succ = summary["attack_success"].get(attack, float("nan"))
    for name, d in dets.items():
      rows.append(f"<tr><td>{html.escape(attack)}</td><td>{succ:.2f}</td>"
                  f"<td>{html.escape(name)}</td><td>{_auroc_cell(d)}</td>"
                  f"<td>{d['tpr_at_5fpr']:.3f}</td>"
                  f"<td>{d['n_train']} / {d['n_test']}</td></tr>")
  head = ("<tr><th>attack@eps(/255)</th><th>success rate</th><th>detector</th>"
          "<th>AUROC [95% interval]</th>"
          "<th>TPR at 5% FPR</th><th>images train / test</th></tr>")
  return f"<table>{head}{''.join(rows)}</table>"


def defense_table(summary) -> str:
  d = summary["defenses"]
  if not d:
    return "<p>No defenses configured.</p>"
  names = sorted(d, key=lambda n: (n != "none", n))
  cols = list(dict.fromkeys(c for n in names for c in d[n]))
  rows = "".join(
      "<tr><th>" + html.escape(n) + "</th>" + "".join(
          f"<td>{d[n][c]:.3f}</td>" if c in d[n] else "<td>—</td>" for c in cols)
      + "</tr>" for n in names)
  head = "<tr><th>defense</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
  return f"<table>{head}{rows}</table>"


_CSS = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:0.5em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}
img{max-width:100%}pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto}
.note{color:#555;font-size:13px;max-width:1100px}
.warn{color:#a40000;font-size:13px;max-width:1100px}"""


def _per_image_columns(results) -> dict[str, np.ndarray]:
  """Every per-image scalar of the evaluators' results, ``{column name: (n,)}``."""
  columns = {}

  def visit(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(f"{prefix}/{k}", v)
    elif node is not None and np.ndim(node) == 1:
      columns[prefix] = np.asarray(node)

  for name, result in results.items():
    for f in dataclasses.fields(result):
      visit(f"{name}/{f.name}", getattr(result, f.name))
  return columns


def write_report(out_dir: Path, inputs, results, summary, *, settings: dict[str, Any],
                 class_names, run: dict[str, Any]) -> Path:
  """Writes ``report.html``, ``metrics.json`` and the CSV tables; returns the HTML path.

  Args:
    out_dir: where to write.
    inputs: the images' ``evaluators.Inputs``.
    results: ``{evaluator name: typed result}`` of all images.
    summary: ``analysis.summarize``'s dict.
    settings, class_names, run: shown in the report.
  """
  out_dir = Path(out_dir)
  from cejax.jobs.store import write_json_atomic, write_text_atomic

  loc, det, per = (io.StringIO(newline="") for _ in range(3))
  w = csv.writer(loc)
  w.writerow(["method", "metric", "mean", "ci_low", "ci_high"])
  for m, row in summary["methods"].items():
    for metric, v in row.items():
      if metric in ("t_iou", "t_iobb"):
        levels = summary.get("iou_thresholds" if metric == "t_iou" else "iobb_levels", ())
        for level, ci in zip(levels, v, strict=False):
          w.writerow([m, f"{metric}@{level}", *ci])
        continue
      w.writerow([m, metric, *(v if isinstance(v, (list, tuple)) else (v, "", ""))])
  w = csv.writer(det)
  w.writerow(["attack", "detector", "auroc", "auroc_ci_low", "auroc_ci_high",
              "tpr_at_5fpr", "n_train", "n_test"])
  for attack, dets in summary["detection"].items():
    for name, d in dets.items():
      lo, hi = d.get("auroc_ci", (float("nan"), float("nan")))
      w.writerow([attack, name, d["auroc"], lo, hi, d["tpr_at_5fpr"], d["n_train"],
                  d["n_test"]])
  columns = _per_image_columns(results)
  w = csv.writer(per)
  w.writerow(["index", "has_box", "correct"] + list(columns))
  for i in range(len(inputs.index)):
    w.writerow([int(inputs.index[i]), bool(inputs.has_box[i]), float(inputs.correct[i])]
               + [float(v[i]) for v in columns.values()])
  sections = [
      f"<h1>cejax analysis: {html.escape(run.get('preset', ''))} on "
      f"{html.escape(str(settings.get('data', '')))}</h1>",
      f"<p>{summary['num_images']} {html.escape(settings['split'])} images "
      f"({summary['num_with_box']} with a box); clean accuracy "
      f"{summary['clean_accuracy']:.3f}; checkpoint step {run.get('step')}.</p>",
      "<h2>Maps</h2><p class=note>Larger = more important. The gradient, CAM, RISE and "
      "occlusion maps are for the target class (the boxed finding, else the prediction). "
      "The CE maps show <i>minus</i> the expected causal effect "
      "&Sigma;<sub>c</sub> p(c|x)(p(c|do(X<sub>M</sub>=v)) &minus; p(c|x)) of filling each "
      "mask with the data mean, averaged over the masks covering each pixel: it sums over "
      "classes, so it is the same map whatever the target. Occlusion is the CE map of the "
      "target's probability with sliding windows (equal to Captum's Occlusion). The "
      "green rectangle is the ground-truth box.</p>",
      _img(figure_grid(inputs, results["maps"].maps, class_names=class_names)
           if "maps" in results else ""),
      "<h2>Localization and faithfulness</h2><p class=note>Mean and 95% bootstrap interval "
      "over images (localization over images with a box). Pointing game (Zhang et al.): "
      "a hit when the map's maximum (first in row-major order) lies in the box or closer "
      f"than {summary.get('pointing_tolerance_px', float('nan')):.2f} px to it (their 15 "
      "px at 224 px, scaled to the image); a flat map is a miss. Hit rate (CheXlocalize): "
      "the maximum inside the box, no tolerance. IoU at half range: the region above half "
      "the map's range vs the box; T(IoU): the fraction of images whose IoU exceeds each "
      "threshold. Otsu mIoU (CheXlocalize): the region above Otsu's threshold of the map "
      "as uint8 vs the box. T(IoBB) (Wang et al., ChestX-ray8): boxes around the connected "
      "regions of the map thresholded at 60 and 180 of 255; the fraction of images with a "
      "box whose intersection with the ground truth over its own area exceeds each level. "
      "Deletion/insertion (Petsiuk et al.): AUC of the predicted class's probability as "
      "the top pixels are replaced by a substrate / restored into it, one image row a "
      "step. Their deletion substrate is zero (the data mean), "
      "the same fill the CE and occlusion maps are built from, which favours those maps; "
      "the blur-fill deletion column scores every map with a perturbation none was built "
      "from. Insertion starts from their blurred copy (11 x 11 kernel, sigma 5). Rank "
      "correlation: Spearman with average ranks for ties between the maps of the trained "
      "and a re-initialised model (lower = the map depends more on the model).</p>",
      metrics_table(summary),
      "<h2>Causal effects under attack</h2><p class=note>Distribution of per-mask expected "
      "CE (grid masks) on clean and adversarial versions of the same images.</p>",
      _img(histograms(results["attacks"].effects) if "attacks" in results else ""),
      "<h2>Detecting adversarial images</h2><p class=note>Logistic regressions (Optax) on "
      "CE features (effect mean, spread, minimum, peak, entropy, spatial dispersion, "
      "active fraction, and latent-CE mean/spread/minimum), against two baselines: "
      "maximum confidence, and feature squeezing (prediction change under 4-bit + median "
      "squeezing). Images are split by index into train and test halves; only images "
      "classified correctly whose attack succeeded are used. AUROC intervals: percentile "
      "bootstrap over the test images, each image's clean and adversarial version kept "
      "together.</p>",
      detection_table(summary), _img(roc_figure(summary)),
      "<h2>Input-transform defenses</h2><p class=note>Accuracy with each defense, on clean "
      "images and under attacks crafted on the undefended model, and under BPDA-PGD, an "
      "adaptive attack that differentiates through the defense as the identity. These "
      "defenses are weak against adaptive attacks: compare the last column. The model was "
      "trained on unmodified images, so a defense that changes the image a lot (binary "
      "halftones) also costs clean accuracy; training on transformed inputs, as the "
      "halftoning papers do, is not part of this analysis.</p>",
      defense_table(summary),
      _img(defended_figure(inputs, results["defenses"]) if "defenses" in results else "",
           "CE maps (grid masks) of the defended inputs:"),
      "<h2>Settings</h2><pre>" + html.escape(json.dumps(
          {"analysis": settings, "run": run}, indent=2, sort_keys=True, default=str))
      + "</pre>",
  ]
  page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cejax report</title>"
          f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")
  # Every file atomically, the summary last: metrics.json present means the report is.
  for name, table in (("localization.csv", loc), ("detection.csv", det),
                      ("per_image.csv", per)):
    write_text_atomic(out_dir / name, table.getvalue())
  path = out_dir / "report.html"
  write_text_atomic(path, page)
  write_json_atomic(out_dir / "metrics.json", summary)
  return path
