"""The analysis library: evaluators, their typed results and storage, resume and
settings checks, the worker split (``analyze.py`` end to end is in test_analyze)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from cejax import attacks, effects, masks, metrics
from cejax.attacks import defenses
from cejax.data import pipeline
from cejax.forwards import latent
from cejax.jobs import analysis, evaluators, store
from cejax.jobs import config as config_lib


def test_the_progress_bar_names_the_stage_that_is_computing():
  """An evaluator's results are finished before the bar names the next stage (with
  asynchronous dispatch they were still computing under the next one's name)."""

  @jax.jit
  def slow(x):  # a fraction of a second of work, dispatched asynchronously
    return jax.lax.fori_loop(0, 20, lambda i, y: jnp.tanh(y @ y), x)

  slow(jnp.zeros((600, 600))).block_until_ready()  # compile outside the check
  done = {}

  class Slow:
    name = "slow"

    def evaluate(self, inputs, earlier, *, key):
      done["slow"] = slow(jnp.full((600, 600), 1e-3))
      return {"value": done["slow"]}

  class Next:
    name = "next"

    def evaluate(self, inputs, earlier, *, key):
      return {}

  class Bar:
    seen = []

    def set_postfix(self, stage):
      self.seen.append((stage, [x.is_ready() for x in done.values()]))

  bar = Bar()
  analysis.evaluate_chunk([Slow(), Next()], None, key=None, progress=bar)
  assert bar.seen == [("slow", []), ("next", [True])]


def test_store_round_trips_nested_results_and_names_a_corrupt_file(tmp_path):
  tree = {"inputs": {"index": np.arange(3)},
          "localization": {"curves": {"deletion_zero": {"ce_grid": np.ones(3, np.float32)}},
                           "pointing": {"ce/odd name": np.zeros(3)}}}
  store.save_tree(tmp_path / "0000.npz", tree)
  back = store.load_tree(tmp_path / "0000.npz")
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  jax.tree.map(np.testing.assert_array_equal, back, tree)
  # Plain numpy reads the file too: leaves plus the JSON structure naming them.
  with np.load(tmp_path / "0000.npz") as raw:
    names = json.loads(str(raw["structure"]))
    np.testing.assert_array_equal(raw[names["inputs"]["index"]], np.arange(3))
  (tmp_path / "0001.npz").write_bytes(b"not a zip file")
  with pytest.raises(ValueError, match="0001.npz is not a readable cejax results file"):
    store.load_tree(tmp_path / "0001.npz")
  assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_record_settings_refuses_other_settings_and_fresh_discards(tmp_path):
  out = tmp_path / "analysis"
  store.record_settings(out, {"rise_masks": 64, "seed": 0})
  (out / "chunks").mkdir()
  (out / "chunks" / "0000.npz").write_bytes(b"x")
  store.record_settings(out, {"rise_masks": 64, "seed": 0})  # same settings: resume
  assert (out / "chunks" / "0000.npz").exists()
  with pytest.raises(ValueError, match=r"different settings \(\['rise_masks'\]\): "
                                       "rise_masks: 64 there, 32 now. Pass --fresh"):
    store.record_settings(out, {"rise_masks": 32, "seed": 0})
  assert json.loads((out / "settings.json").read_text())["rise_masks"] == 64
  with pytest.raises(ValueError, match="--fresh with several workers"):
    store.record_settings(out, {"rise_masks": 32, "seed": 0}, fresh=True, num_workers=2)
  assert (out / "chunks" / "0000.npz").exists()
  store.record_settings(out, {"rise_masks": 32, "seed": 0}, fresh=True)
  assert not (out / "chunks").exists()
  assert json.loads((out / "settings.json").read_text())["rise_masks"] == 32


def test_select_orders_evaluators_and_names_the_closest_and_the_missing():
  chosen = evaluators.select(("detection", "attacks", "maps"))
  assert [c.name for c in chosen] == ["maps", "attacks", "detection"]
  with pytest.raises(ValueError, match="Unknown evaluator 'localisation'.*Did you mean "
                                       "'localization'"):
    evaluators.select(("maps", "localisation"))
  with pytest.raises(ValueError, match=r"'detection' requires \['attacks'\]"):
    evaluators.select(("maps", "detection"))


@pytest.fixture(scope="module")
def setup(data_dir):
  """A random-weight DenseNet (the tiny preset cut to two blocks of two layers, as the
  smoke runs are; no training needed) on the smoke data."""
  config = smoke_config(data_dir)
  run = {"preset": "tiny", "num_classes": 5, "in_channels": 1, "multi_label": False,
         "dtype": "float32", "overrides": {"block_config": (2, 2)}, "step": 0}
  model = evaluators.random_model(run, latent_stage="block2", seed=1)
  dataset = pipeline.load_dataset(config.data)
  return config, model, dataset, evaluators.pixel_space(dataset.normalization)


def _inputs(setup, n=4):
  config, model, dataset, space = setup
  batch = dataset.batch("test", np.arange(n))
  return evaluators.prepare_inputs(model, batch, space=space, index=np.arange(n))


def test_ce_features_are_their_definitions(setup):
  config, model, _, _ = setup
  s = config.analysis
  inputs = _inputs(setup, n=2)
  cells = config.masks.grid_cells
  feats, grid_effects = evaluators.ce_features(model, inputs.images, inputs.target,
                                               settings=s, grid_cells=cells)
  assert feats.shape == (2, len(evaluators.CE_FEATURES))
  grid = np.asarray(masks.to_array(masks.grid(shape=(32, 32), n=cells)))
  yy, xx = np.mgrid[0:32, 0:32]
  for i in range(2):
    x, t = inputs.images[i], int(inputs.target[i])
    e = np.asarray(effects.causal_effect(model.logits_fn, x, grid, target=t).effects)
    width = model.prefix_fn(x[None]).shape[-1]
    lat = np.asarray(effects.causal_effect(
        latent.forward(model.prefix_fn, model.suffix_fn), x,
        latent.latent_interventions(channels=np.arange(width), values=[0.0]),
        target=t).effects)
    p = np.abs(e) / np.abs(e).sum()
    cy = (grid * yy).sum((1, 2)) / grid.sum((1, 2))
    cx = (grid * xx).sum((1, 2)) / grid.sum((1, 2))
    my, mx = (p * cy).sum(), (p * cx).sum()
    want = {"mean": e.mean(), "std": e.std(), "min": e.min(), "max_abs": np.abs(e).max(),
            "entropy": -(p * np.log(p)).sum() / np.log(len(e)),
            "dispersion": np.sqrt((p * ((cy - my) ** 2 + (cx - mx) ** 2)).sum()) / 32,
            "active": (np.abs(e) > 0.01).mean(), "latent_mean": lat.mean(),
            "latent_std": lat.std(), "latent_min": lat.min()}
    got = dict(zip(evaluators.CE_FEATURES, np.asarray(feats[i]), strict=True))
    for name, value in want.items():
      np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(grid_effects[i], e, atol=1e-7)


def test_defenses_run_only_the_configured_attacks_and_reuse_their_images(setup):
  config, model, _, space = setup
  s = config.analysis.copy_and_resolve_references()
  s.attacks, s.epsilons, s.defense_eps, s.attack_steps = ("fgsm", "bim"), (8 / 255,), \
      8 / 255, 2
  s.defenses = ("bit_depth",)
  context = evaluators.Context(model, s, space, config.masks)
  inputs = _inputs(setup)
  # Labels = the clean predictions, so that accuracy starts at 1 and attacks lower it.
  inputs = dataclasses.replace(inputs, label=np.argmax(inputs.logits, -1))
  key = jax.random.key(0)
  # What the defenses evaluator reads of the attacks evaluator: its adversarial images.
  adversarial = {f"{name}@8": getattr(attacks, name)(
      model.logits_fn, inputs.pixels, inputs.label, eps=8 / 255, space=space,
      **({} if name == "fgsm" else {"steps": 2})).images for name in ("fgsm", "bim")}
  under_attack = evaluators.UnderAttack(success={}, features={}, effects={}, confidence={},
                                        squeeze={}, adversarial=adversarial)
  defended = evaluators.DefensesEvaluator(context)
  reused = defended.evaluate(inputs, {"attacks": under_attack}, key=key)
  crafted = defended.evaluate(inputs, {}, key=key)
  assert set(reused.accuracy) == {"none", "bit_depth"}
  assert set(reused.accuracy["bit_depth"]) == {"clean", "fgsm", "bim", "bpda_pgd"}
  assert set(reused.accuracy["none"]) == {"clean", "fgsm", "bim"}
  jax.tree.map(np.testing.assert_array_equal, reused.accuracy, crafted.accuracy)
  assert float(np.mean(reused.accuracy["none"]["clean"])) == 1.0
  assert float(np.mean(reused.accuracy["none"]["bim"])) < 1.0
  # The accuracy under FGSM with bit depth is the defended model's on FGSM's images.
  adv = attacks.fgsm(model.logits_fn, inputs.pixels, inputs.label, eps=8 / 255, space=space)
  logits = model.logits_fn(space.normalize(defenses.bit_depth(adv.images)))
  np.testing.assert_array_equal(reused.accuracy["bit_depth"]["fgsm"],
                                np.argmax(logits, -1) == inputs.label)


def test_detection_uses_correct_successful_images_and_separates_separable_features():
  n = 40
  rng = np.random.default_rng(0)
  success = np.ones(n, bool)
  success[::4] = False
  correct = np.ones(n)
  correct[1::5] = 0
  clean = rng.normal(size=(n, 3))
  under_attack = evaluators.UnderAttack(
      success={"fgsm@8": success},
      features={"clean": clean, "fgsm@8": clean + 5.0},
      effects={}, confidence={"clean": rng.normal(size=n), "fgsm@8": rng.normal(size=n)},
      squeeze={"clean": np.zeros(n), "fgsm@8": np.zeros(n)}, adversarial=None)
  out = evaluators.detection(under_attack, correct, attack="fgsm@8")
  used = int((success & (correct > 0.5)).sum())
  for det in out.values():
    assert det["n_train"] + det["n_test"] == used
  assert out["CE features"]["auroc"] == 1.0
  assert out["squeezing"]["auroc"] == 0.5  # constant scores: no information


class _Failing:
  """A user-defined evaluator that fails on its second chunk (a killed run)."""

  name, requires, result_type = "failing", (), None

  def __init__(self):
    self.calls = 0

  def evaluate(self, inputs, earlier, *, key):
    self.calls += 1
    if self.calls == 2:
      raise KeyboardInterrupt

  def summarize(self, results, inputs):
    return {}


def test_killed_and_split_runs_resume_to_the_uninterrupted_results(setup, tmp_path):
  config, model, dataset, space = setup
  s = config.analysis.copy_and_resolve_references()
  s.methods = ("ce_grid", "gradient", "grad_cam")
  s.chunk_size = 2
  context = evaluators.Context(model, s, space, config.masks)
  chosen_classes = evaluators.select(("maps", "localization"))
  chosen = analysis.build(chosen_classes, context)
  indices = analysis.image_list(dataset, "test", 5)  # 3 chunks, the last one padded
  kw = dict(model=model, space=space, settings=s, indices=indices, key=jax.random.key(0),
            identity="run-a")
  whole, computed = analysis.run_chunks(chosen, dataset, out_dir=tmp_path / "whole", **kw)
  assert computed == 3
  failing = _Failing()
  with pytest.raises(KeyboardInterrupt):
    analysis.run_chunks(chosen + [failing], dataset, out_dir=tmp_path / "killed", **kw)
  assert [p.name for p in (tmp_path / "killed" / "chunks").iterdir()] == ["0000.npz"]
  kept = (tmp_path / "killed" / "chunks" / "0000.npz").stat().st_mtime_ns
  # The rest is finished by two workers; each computes only its own chunks.
  mine, computed = analysis.run_chunks(chosen, dataset, out_dir=tmp_path / "killed",
                                       worker=1, num_workers=2, **kw)
  assert [p.exists() for p in mine] == [True, True, False] and computed == 1
  analysis.run_chunks(chosen, dataset, out_dir=tmp_path / "killed", worker=0,
                      num_workers=2, **kw)
  assert (tmp_path / "killed" / "chunks" / "0000.npz").stat().st_mtime_ns == kept
  want_inputs, want = analysis.load_results(whole, chosen_classes)
  got_inputs, got = analysis.load_results(mine, chosen_classes, indices=indices,
                                          chunk_size=2, identity="run-a")
  jax.tree.map(np.testing.assert_array_equal, (got_inputs, got), (want_inputs, want))
  assert isinstance(got["localization"], evaluators.Localization)
  np.testing.assert_array_equal(got_inputs.index, np.arange(5))
  assert set(got["maps"].maps) == set(s.methods) | set(metrics.CHANCE_MAPS)
  assert got["maps"].maps["ce_grid"].dtype == np.float16
  # The stored maps are those of a direct call (here the gradient of image 4, which
  # the padded last chunk holds alongside a repeat of image 4).
  x = dataset.batch("test", np.arange(5))["image"]
  direct = evaluators.compute_maps(model, jnp.asarray(x), got_inputs.target,
                                   key=jax.random.fold_in(jax.random.key(0), 2),
                                   settings=s, mask_spec=config.masks,
                                   methods=("gradient",))["gradient"]
  np.testing.assert_allclose(got["maps"].maps["gradient"][4], direct[4], rtol=2e-3,
                             atol=1e-7)
  summary = analysis.summarize(chosen, got_inputs, got)
  assert set(summary["methods"]) == set(s.methods) | set(metrics.CHANCE_MAPS)
  assert summary["num_images"] == 5
  assert dataclasses.is_dataclass(got_inputs)


def test_config_picks_evaluators_and_methods_and_refuses_unknown_ones(setup):
  config, model, _, space = setup
  s = config.analysis.copy_and_resolve_references()
  s.methods = ("ce_grid", "gradcam")
  with pytest.raises(ValueError, match=r"Unknown map methods \['gradcam'\]"):
    evaluators.MapsEvaluator(evaluators.Context(model, s, space, config.masks))
  s.methods = ("ce_grid",)
  s.attacks = ("fgsm", "cw")
  with pytest.raises(ValueError, match=r"Unknown attacks \['cw'\]"):
    evaluators.AttacksEvaluator(evaluators.Context(model, s, space, config.masks)
                                ).evaluate(_inputs(setup), {}, key=jax.random.key(0))
  with pytest.raises(ValueError, match="needs Context.random_model"):
    evaluators.SanityEvaluator(evaluators.Context(model, s, space, config.masks))


def test_ce_rise_map_is_the_coverage_weighted_mean_effect(setup):
  """The analysis' ``ce_rise`` map: minus the mean expected CE of the RISE masks that
  cover each pixel (as for the grid and sliding maps), not RISE's kept-pixel weighting."""
  config, model, _, _ = setup
  s = config.analysis
  inputs = _inputs(setup, n=1)
  key = jax.random.key(4)
  m = config.masks
  got = evaluators.compute_maps(model, inputs.images, inputs.target, key=key, settings=s,
                                mask_spec=m, methods=("ce_rise",))["ce_rise"][0]
  recipe = masks.rise(jax.random.fold_in(key, 0), num=m.rise_masks, shape=(32, 32),
                      cells=m.rise_cells)
  dense = np.asarray(masks.to_array(recipe))
  e = np.asarray(effects.causal_effect(model.logits_fn, inputs.images[0], dense).effects)
  want = -(e[:, None, None] * dense).sum(0) / dense.sum(0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.heavy
def test_optimised_mask_methods_are_the_library_calls(setup):
  """The analysis' optimised-mask maps: the sum over areas of extremal perturbations and
  of CE-optimal masks (expected CE, zero fill), and meaningful perturbations' map."""
  from cejax.optimised import ce_optimal, extremal, meaningful
  config, model, _, _ = setup
  s = config.analysis.copy_and_resolve_references()
  o = config.optimised.copy_and_resolve_references()
  o.areas, o.iterations, o.meaningful_iterations, o.step, o.sigma = (0.1, 0.3), 4, 3, 2, 2.0
  inputs = _inputs(setup, n=2)
  key = jax.random.key(5)
  got = evaluators.compute_maps(model, inputs.images, inputs.target, key=key, settings=s,
                                mask_spec=config.masks,
                                methods=("extremal_perturbation", "ce_optimal",
                                         "meaningful_perturbation"), optimised=o)
  kw = dict(areas=(0.1, 0.3), iterations=4, step=2, sigma=2.0, batch_size=2)
  ep = extremal.extremal_perturbation(model.logits_fn, inputs.images, inputs.target, **kw)
  np.testing.assert_allclose(got["extremal_perturbation"], ep.masks.sum(1), atol=1e-5)
  ce = ce_optimal.ce_optimal_mask(model.logits_fn, inputs.images, inputs.target, **kw)
  np.testing.assert_allclose(got["ce_optimal"], ce.masks.sum(1), atol=1e-5)
  k4 = jax.random.split(jax.random.fold_in(key, 1), 4)[3]
  mp = meaningful.meaningful_perturbation(model.logits_fn, inputs.images, inputs.target,
                                          key=k4, iterations=3)
  np.testing.assert_allclose(got["meaningful_perturbation"], mp, atol=1e-5)
  bad = config.copy_and_resolve_references()
  bad.optimised.areas = (0.0,)
  with pytest.raises(ValueError, match="config.optimised.areas"):
    config_lib.validate(bad, "analysis")


def test_localization_curves_of_stacked_methods_equal_one_call_per_method():
  """The evaluator scores every method's maps in one call per metric on the maps
  stacked along the image axis; each image is scored on its own, so the scores are
  those of one call per method (deletion/insertion, the pointing game, mass, IoU,
  best IoBB, Otsu IoU, hit), bit for bit."""
  from cejax import metrics
  from cejax.jobs.evaluators import localization
  from cejax.metrics import chestxray

  w = jax.random.normal(jax.random.key(0), (12 * 10 * 2, 3))
  logits_fn = lambda x: jnp.tanh(x.reshape(len(x), -1) @ w) * 3.0  # noqa: E731
  images = jax.random.uniform(jax.random.key(1), (3, 12, 10, 2))
  maps = {name: jax.random.uniform(jax.random.key(i), (3, 12, 10))
          for i, name in enumerate(("a", "b", "c"), start=2)}
  maps["b"] = jnp.round(maps["b"] * 3)  # ties
  boxes = jnp.zeros((3, 12, 10), bool).at[:, 2:6, 3:7].set(True)
  targets = jnp.array([0, 2, 1])
  # Compiled, as the evaluator runs it (eagerly, every metric's operations compile one
  # by one); the per-method references compiled too.
  got = jax.jit(lambda *a: localization.localization(
      logits_fn, *a, activation="softmax", step=7, batch_size=4))(images, maps, boxes,
                                                                  targets)
  curves = jax.jit(lambda *a: metrics.deletion_insertion(logits_fn, *a, step=7,
                                                         batch_size=4))
  for name, m in maps.items():
    want = curves(images, m, targets)
    for curve, v in want.items():
      np.testing.assert_array_equal(got.curves[curve][name], v, err_msg=(name, curve))
    for field, fn in (("pointing", metrics.pointing_game), ("mass", metrics.mass_in_box),
                      ("iou", metrics.iou), ("iobb", chestxray.best_iobb),
                      ("otsu_iou", chestxray.otsu_iou), ("hit", chestxray.hit)):
      np.testing.assert_array_equal(getattr(got, field)[name],
                                    np.asarray(jax.jit(fn)(m, boxes), np.float32),
                                    err_msg=field)
  # No methods: empty scores, not an error (a config may run the evaluator without maps).
  empty = localization.localization(logits_fn, images, {}, boxes, targets,
                                    activation="softmax", step=7, batch_size=4)
  assert empty.pointing == {} and all(v == {} for v in empty.curves.values())
