"""Packaging a user can rely on: one version, metadata, links that work in any clone and on any forge."""
import re
import tomllib
from pathlib import Path

import expressive_attention

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# The project has no public home yet: no file may point at one it does not have (#23, item 7).
NO_HOME = re.compile(r"github(?:usercontent)?\.com/expressive-attention", re.I)


def test_version_is_defined_once():
    project = PYPROJECT["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "expressive_attention.__version__"}
    cff = (ROOT / "CITATION.cff").read_text()
    assert f'version: "{expressive_attention.__version__}"' in cff  # the citation follows the package


def test_metadata_a_user_looks_for():
    project = PYPROJECT["project"]
    assert project["authors"] and project["keywords"] and len(project["classifiers"]) >= 5
    assert project["urls"] == {"Paper": "https://arxiv.org/abs/2407.18601"}  # until a real home exists
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "src" / "expressive_attention" / "py.typed").exists()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["expressive_attention"]
    assert "graft tests" in (ROOT / "MANIFEST.in").read_text()  # the sdist carries the tests


def _slug(heading: str) -> str:
    """The anchor a forge (GitHub, GitLab, Gitea) gives a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)  # no headings inside code blocks
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


def _links(md: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.S | re.M)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_readme_links_are_relative_and_resolve():
    """README links into the project are relative (they work in any clone and on any forge), and each
    resolves to a file or folder of the repository and, with #anchor, to a heading of that file."""
    readme = ROOT / "README.md"
    targets = _links(readme)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert len(relative) >= 20, relative  # docs, sources, the plot, CITATION.cff, in-page anchors
    assert any(t.startswith("#") for t in relative) and any(t.startswith("docs/") for t in relative)
    for t in relative:
        path, _, anchor = t.partition("#")
        target = (readme.parent / path).resolve() if path else readme
        assert target.exists(), f"README links to {t!r}: {path} does not exist"
        assert ROOT.resolve() in target.parents or target == ROOT.resolve(), t
        if anchor:
            assert target.suffix == ".md" and anchor in _anchors(target), f"README links to {t!r}: no such heading"
    for section in ("## Installation", "## Citation", "## Prior art"):
        assert section in readme.read_text()
    assert "ReBased" in readme.read_text() and "parallel_rebased" in readme.read_text()


def test_docs_relative_links_resolve():
    for md in sorted((ROOT / "docs").glob("*.md")):
        for t in _links(md):
            if re.match(r"[a-z]+:", t):
                continue
            path, _, anchor = t.partition("#")
            target = (md.parent / path).resolve() if path else md
            assert target.exists(), f"{md.name} links to {t!r}: {path} does not exist"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{md.name} links to {t!r}: no such heading"


def test_no_links_to_a_home_the_project_does_not_have():
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "CITATION.cff", *sorted((ROOT / "docs").rglob("*.md"))]
    bad = [f"{f.relative_to(ROOT)}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
           if NO_HOME.search(line)]
    assert not bad, bad
    cff = (ROOT / "CITATION.cff").read_text()
    assert "repository-code:" not in cff and not re.search(r"^url:", cff, re.M)


def test_readme_installs_from_a_clone_or_a_wheel_not_from_an_index():
    readme = (ROOT / "README.md").read_text()
    install = readme[readme.index("## Installation"):readme.index("\n## ", readme.index("## Installation") + 5)]
    commands = [line.split("#")[0].strip() for block in re.findall(r"^```bash\n(.*?)^```", install, re.S | re.M)
                for line in block.splitlines()]
    assert "pip install ." in commands and "python -m build" in " ".join(commands)
    assert any(c.startswith("pip install dist/") for c in commands)
    assert not [c for c in commands if re.search(r"pip install\s+[\"']?expressive-attention", c)], commands
    index_lines = [line for line in install.splitlines() if re.search(r"pip install [\"']?expressive-attention", line)]
    assert index_lines and all("once released" in line.lower() for line in index_lines), index_lines


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
