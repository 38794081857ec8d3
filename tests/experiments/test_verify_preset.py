"""The verify preset's grid is what docs/ladder.md says it is (families, rungs, axes, kinds, seeds),
and preset axes behave: shared points are one run, records say which axes they lie on."""
import re
from pathlib import Path

import pytest

from expressive_attention.experiments.presets import Preset, get_preset

DOC = Path(__file__).resolve().parents[2] / "docs" / "ladder.md"


def _section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def _table(section: str, header: str) -> list[list[str]]:
    lines = section[section.index(header):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_verify_grid_matches_the_docs():
    doc = _section("The verify preset")
    preset = get_preset("verify")
    grid = preset.grid()

    fams = _table(doc, "| family | rung |")
    assert [(f, r) for f, r, *_ in fams] == [(f, p.labels[0]) for f, p in preset.families.items()]
    assert all(len(p.rungs) == 1 for p in preset.families.values())

    axes = {a: (pts, fixed) for a, pts, fixed in _table(doc, "| axis | points | fixed |")}
    assert set(axes) == set(preset.axes) == {"budget", "size"}
    steps = [int(x) for x in re.findall(r"\d+", axes["budget"][0])]
    dms = [int(x) for x in re.findall(r"\d+", axes["size"][0])]
    assert steps == [pt["steps"] for pt in preset.axes["budget"]] == [450, 1350, 4050]
    assert dms == [pt["d_model"] for pt in preset.axes["size"]] == [32, 64, 128]
    assert axes["budget"][1] == f"d_model {preset.base['d_model']}"
    assert axes["size"][1] == f"{preset.base['steps']} steps"
    assert steps[1] == 3 * steps[0] and steps[2] == 9 * steps[0]

    m = re.search(r"kinds: ([\w, -]+); seeds: (\d+); runs: (\d+)", doc)
    assert m, "docs/ladder.md must state 'kinds: ...; seeds: N; runs: M' for the verify preset"
    kinds = [k.strip() for k in m.group(1).split(",")]
    assert kinds == [("dpa" if a == "dpa" else "ea" if v == "saturating" else f"ea-{v}")
                     for a, v in preset.kind_specs()] == ["dpa", "ea", "ea-squared"]
    assert int(m.group(2)) == preset.seeds == 3
    # 5 distinct points per rung (the base is on both axes), every kind, every seed
    assert int(m.group(3)) == len(grid) == len(fams) * 5 * 3 * 3
    assert len({p.config.key() for p in grid}) == len(grid)

    quick = get_preset("quick")
    for p in grid:  # the same model and optimiser as the quick preset, off-base only along one axis
        c, q = p.config, quick.grid()[0].config
        assert (c.n_layers, c.n_heads, c.lr, c.batch_size, c.warmup, c.eval_sequences) == \
               (q.n_layers, q.n_heads, q.lr, q.batch_size, q.warmup, q.eval_sequences)
        assert len(p.point) <= 1 and set(p.point) <= {"steps", "d_model"}
        assert ("budget" in p.axes) == (c.d_model == 64) and ("size" in p.axes) == (c.steps == 450)
    for fam in ("pointer", "lagged_digits"):  # rungs of the quick ladder
        assert preset.families[fam].rungs[0] in quick.families[fam].rungs
    recall = preset.families["recall"].rungs[0]  # the dense layout: every slot after the pairs is a query
    assert recall == {"K": 2, "Q": 30, "n_keys": 16, "n_values": 16, "seq_len": 64}


def test_axes_merge_shared_points_and_validate():
    p = Preset(name="t", families={"f": {"task": "pointer", "rungs": [{"T": 2}, {"T": 4}]}},
               base={"steps": 10, "d_model": 16}, seeds=2,
               axes={"budget": [{"steps": 10}, {"steps": 30}], "size": [{"d_model": 8}, {"d_model": 16}]})
    grid = p.grid()
    assert len(grid) == 2 * 2 * 3 * 2  # seeds x rungs x 3 distinct points x kinds
    base = [g for g in grid if g.is_base]
    assert base and all(set(g.axes) == {"budget", "size"} and g.point == {} for g in base)
    assert {g.point_label for g in grid} == {"", "steps=30", "d_model=8"}
    assert Preset.from_dict(p.to_dict()).grid()[5].config == grid[5].config
    with pytest.raises(ValueError, match="axis 'size'"):
        Preset(name="t", families={"f": {"task": "pointer", "rungs": [{"T": 2}]}}, axes={"size": [{}]})
    with pytest.raises(ValueError, match=r"varies \['steps'\] along its axes"):
        p.replace(base={"steps": 99, "tokens": None})  # what `ea ladder --steps 99` asks for
    assert p.replace(base={"lr": 3e-3}).grid()[0].config.lr == 3e-3
    plain = Preset(name="t", families={"f": {"task": "pointer", "rungs": [{"T": 2}]}})
    assert all(g.is_base and g.axes == () for g in plain.grid())


def test_tiny_preset_with_axes_writes_the_scaling_section(tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from ladder_tiny_tasks import tiny_preset

    from expressive_attention.experiments import ResultsStore, run_ladder

    preset = tiny_preset()
    preset.families["tiny"].rungs = preset.families["tiny"].rungs[:1]
    preset.families["tiny"].labels = ["lag=1"]
    preset.axes = {"budget": [{"steps": 6}, {"steps": 12}], "size": [{"d_model": 8}, {"d_model": 16}]}
    res = run_ladder(preset, tmp_path, workers=1, progress=False, checkpoints=False, command="ea ladder --axes")
    assert res["ran"] == 2 * 3 * 2 and not res["failed"]  # seeds x points x kinds
    recs = ResultsStore(tmp_path).read()
    assert sorted(tuple(r["ladder"]["axes"]) for r in recs).count(("budget", "size")) == 4
    assert {r["ladder"]["point"].get("steps") for r in recs} == {None, 12}
    report = (tmp_path / "report.md").read_text()
    assert "## Budget and size axes" in report and "scaling_budget.png" in report
    assert "| tiny | lag=1 | ea | 2x (12 steps) |" in report
    assert (tmp_path / "scaling_size.png").exists()
    with open(tmp_path / "summary.csv") as f:  # the ladder table: base points only
        assert len(f.read().splitlines()) == 1 + 2
