"""Sphinx configuration of the API reference, generated from the docstrings.

Built in CI with warnings as errors (`.ci/run`), so a broken docstring fails:
    sphinx-build -W --keep-going -q -b html docs/api build/api
"""

project = "ncfast"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"]
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
exclude_patterns = ["_build"]
html_theme = "alabaster"
