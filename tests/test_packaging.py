"""Packaging a user can rely on: one version, metadata, links that work on a package index page."""
import re
import tomllib
from pathlib import Path

import expressive_attention

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
REPO = "https://github.com/expressive-attention/expressive-attention"


def test_version_is_defined_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "expressive_attention.__version__"}
    cff = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{expressive_attention.__version__}"' in cff  # the citation follows the package


def test_metadata_a_user_looks_for():
    project = PYPROJECT["project"]
    assert project["authors"] and project["keywords"] and len(project["classifiers"]) >= 5
    assert project["urls"]["Repository"] == REPO and "Issues" in project["urls"]
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "src" / "expressive_attention" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["expressive_attention"]
    assert "graft tests" in (ROOT / "MANIFEST.in").read_text()  # the sdist carries the tests


def test_readme_links_work_on_an_index_page():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)]+)\)", readme)
    assert targets
    relative = [t for t in targets if not t.startswith(("https://", "http://"))]
    assert not relative, relative  # relative links and in-page anchors break on PyPI
    for section in ("## Installation", "## Citation", "## Prior art"):
        assert section in readme
    assert "ReBased" in readme and "parallel_rebased" in readme


def test_ruff_is_configured():
    assert PYPROJECT["tool"]["ruff"]["lint"]["select"]
    assert "ruff check" in (ROOT / ".ci" / "run").read_text()
