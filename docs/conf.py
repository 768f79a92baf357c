"""Sphinx configuration of the cejax documentation site.

Build it (warnings are errors, as in ``tests/test_docs.py``)::

    python -m sphinx -W --keep-going -b html docs build/docs

Pages are Markdown (MyST); the API pages are generated from the docstrings by autodoc,
which reads Google-style sections through napoleon. Nothing is downloaded: no
intersphinx, and Sphinx's default theme (alabaster).
"""

import os
import re
import sys

# The repository root, so that autodoc imports this checkout's cejax.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "cejax"
author = "cejax authors"
copyright = "cejax authors"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
root_doc = "index"

# MyST: anchors for headings down to level 3, so pages can link to sections.
myst_heading_anchors = 3

# autodoc: members in the order the source declares them; type hints in the signature.
# The API pages (docs/api/) are written by hand, one automodule per cejax module.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# napoleon: Google-style sections only (Args, Returns, Raises, Attributes).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True

html_theme = "alabaster"
html_title = "cejax"
html_static_path = []

# Signatures name cejax's shape aliases (``cejax.types``) instead of expanding them, and
# print types by their short names (``Array``, not ``jax.jaxlib._jax.Array``).
autodoc_type_aliases = {
    name: f"cejax.types.{name}"
    for name in ("Image", "Images", "Pixels", "Masks", "Maps", "BoxMasks", "Logits",
                 "Targets", "Effects", "PRNGKey", "LogitsFn", "FeaturesFn", "ClassifyFn")
}
autodoc_typehints_format = "short"


# --- docstring conventions Sphinx does not read by itself ----------------------------------

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Parameters):\s*$")
_GROUPED = re.compile(r"^(\s*)([A-Za-z_]\w*(?:, [A-Za-z_]\w*)+):(\s.*)?$")


def _split_grouped_names(app, what, name, obj, options, lines):
  """cejax's docstrings describe related entries together (``graphdef, state: the
  DenseNet ...``). Sphinx would read ``graphdef,`` as a type and ``state`` as the name,
  so each such entry of an Args or Attributes section is written once per name, with the
  shared description."""
  del app, what, name, obj, options
  out, entry_indent, section_indent = [], None, None
  for line in lines:
    header = _SECTION.match(line)
    if header:
      section_indent, entry_indent = len(header.group(1)), None
      out.append(line)
      continue
    indent = len(line) - len(line.lstrip())
    if section_indent is not None and line.strip() and indent <= section_indent:
      section_indent, entry_indent = None, None  # the section ended
    grouped = _GROUPED.match(line) if section_indent is not None else None
    if section_indent is not None and line.strip() and entry_indent is None:
      entry_indent = indent
    if grouped and len(grouped.group(1)) == entry_indent:
      description = (grouped.group(3) or "").strip()
      for one in grouped.group(2).split(", "):
        out.append(f"{grouped.group(1)}{one}: {description}")
      continue
    out.append(line)
  lines[:] = out


def _skip_tuple_fields(app, what, name, obj, skip, options):
  """A NamedTuple's fields are described in its Attributes section; autodoc would list
  each again as "Alias for field number N"."""
  del app, what, name, options
  if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
    return True
  return skip


_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")


def _alias_names(app, what, name, obj, options, signature, return_annotation):
  """An alias inside a union (``LogitsFn | Forward``) reaches the signature as its repr,
  ``TypeAliasForwardRef('cejax.types.LogitsFn')``: print the alias's name."""
  del app, what, name, obj, options
  fix = lambda text: text if text is None else _ALIAS_REPR.sub(r"\1", text)
  return fix(signature), fix(return_annotation)


def setup(app):
  # Before napoleon (priority 500) turns the sections into fields.
  app.connect("autodoc-process-docstring", _split_grouped_names, priority=400)
  app.connect("autodoc-skip-member", _skip_tuple_fields)
  app.connect("autodoc-process-signature", _alias_names)
