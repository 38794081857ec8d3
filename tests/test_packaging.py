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


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_dependency_inside_its_range():
    """`make test` (and CI) installs from constraints.txt: every requirement of the package and of its
    extras is pinned there, to a version its range in pyproject.toml admits."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    pins = _pins()
    project = PYPROJECT["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for req in reqs:
        if req.name == "expressive-attention":  # the dev extra names the others
            continue
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert Version(pins[name]) in req.specifier, f"constraints.txt pins {req.name}=={pins[name]}, outside {req}"
    assert pins["torch"] == "2.13.0"  # the CPU build the Makefile installs first


def test_make_test_installs_the_pins_and_test_latest_the_ranges():
    make = (ROOT / "Makefile").read_text()
    install = make[make.index("$(STAMP):"):make.index("install: $(STAMP)")]
    assert install.count("$(PIN)") == 3 and "PIN     := -c constraints.txt" in make
    latest = make[make.index("test-latest:"):make.index("## After a green")]
    assert "constraints" not in latest and "--upgrade" in latest
