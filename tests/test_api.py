"""The public API: everything in ``cejax.__all__`` exists, and no module of cejax (nor
a test) reaches into another module's private names."""

import ast
from pathlib import Path

import cejax

ROOT = Path(__file__).resolve().parents[1]


def test_all_public_names_exist_and_are_sorted():
  assert list(cejax.__all__) == sorted(cejax.__all__)
  for name in cejax.__all__:
    assert getattr(cejax, name) is not None, name


def _private_uses(path: Path):
  """``module._name`` where ``module`` is imported from cejax in that file."""
  tree = ast.parse(path.read_text())
  modules = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cejax"):
      modules.update(a.asname or a.name for a in node.names)
    elif isinstance(node, ast.Import):
      modules.update(a.asname or a.name for a in node.names if a.name.startswith("cejax"))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in modules and node.attr.startswith("_")
        and not node.attr.startswith("__")):
      yield f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}"
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cejax"):
      for alias in node.names:
        if alias.name.startswith("_"):
          where = f"{path.relative_to(ROOT)}:{node.lineno}"
          yield f"{where}: from {node.module} import {alias.name}"


def test_no_module_uses_another_modules_private_names():
  files = [*ROOT.glob("cejax/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("*.py"),
           *ROOT.glob("benchmarks/*.py")]
  found = [use for path in files for use in _private_uses(path)]
  assert not found, found


def test_unknown_config_keys_name_the_closest_valid_key():
  import pytest

  from cejax.jobs import config
  from configs import chexnet, smoke, synthetic_eval

  for module in (smoke, chexnet, synthetic_eval):  # every shipped config is valid
    config.check_keys(module.get_config(), config.base_config())
  typo = smoke.get_config()
  typo.masks.rise_mask = 100
  with pytest.raises(ValueError, match=r"config\.masks\.rise_mask\. Did you mean "
                                       r"config\.masks\.rise_masks\?"):
    config.check_keys(typo, config.base_config())
  typo = smoke.get_config()
  typo.train.learnig_rate = 0.1
  with pytest.raises(ValueError, match=r"Did you mean config\.train\.learning_rate\?"):
    config.validate(typo, "train")
  extra = smoke.get_config()
  extra.model.overrides.growth_rate = 8  # a declared DenseNet constructor argument
  config.check_keys(extra, config.base_config())
