"""benchmarks/levers/study.py: issue #21's queue and its pre-registered selection rule (docs/levers.md), on
synthetic records."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "levers" / "study.py"
_spec = importlib.util.spec_from_file_location("levers_study", SCRIPT)
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

TEXT = {  # label -> bits/byte at lr 2e-3 (the other lrs are 0.1 worse), the same on both corpora
    "dpa": 2.00, "dpa+gate": 1.98, "ea-power4": 2.10, "ea-power6": 2.05, "ea-power8": 2.04,
    "ea-exp_squared+gain@-1.1513": 2.01, "ea-exp_odd": 1.90, "ea+gate": 2.20, "ea-exp_squared+gate": 2.00,
    "ea[h2]": 2.15, "ea[first]": 2.12,
}
LADDER = {  # label -> token accuracy on pointer and lagged_digits (DPA 0.6, the paper's EA 1.0: lead 0.4)
    "dpa": 0.6, "ea": 1.0, "ea-exp_squared": 0.6, "dpa+gate": 0.6, "ea-power4": 0.95, "ea-power6": 0.9,
    "ea-power8": 0.85, "ea-exp_squared+gain@-1.1513": 0.62, "ea-exp_odd": 0.6, "ea+gate": 0.99,
    "ea-exp_squared+gate": 0.61, "ea[h2]": 0.95, "ea[first]": 0.8,
}


def _write(path: Path, recs: list[dict], append: bool = False) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "results.jsonl", "a" if append else "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in recs))


def _records(tmp_path: Path, drop: str | None = None) -> Path:
    for c in study.CORPORA:
        _write(tmp_path / f"{c}-300", [
            {"kind": m, "lr": float(lr), "seed": 0, "val_bpb": b + (0.0 if lr == "2e-3" else 0.1)}
            for m, b in TEXT.items() for lr in study.LRS if m != drop])
    _write(tmp_path / "ladder", [
        {"kind": m, "metrics": {"token_acc": acc + 0.001 * s}, "ladder": {"family": f}}
        for m, acc in LADDER.items() for f in ("pointer", "lagged_digits", "recall") for s in range(3)])
    return tmp_path


def test_stage1_is_the_ladder_stage_then_every_mechanism_lr_and_corpus():
    jobs = study.stage1_jobs("OUT")
    assert jobs[0].startswith("!") and "ladder_stage.sh" in jobs[0]
    assert len(jobs) == 1 + len(study.LRS) * len(study.CORPORA) * len(study.MECHANISMS)
    assert jobs[1] == "lm --threads 1 --corpus prose --lr 2e-3 --seeds 0 --steps 300 --out OUT/prose-300 --kinds dpa"


def test_selection_follows_the_protocol(tmp_path):
    res = study.select(_records(tmp_path))
    assert res["complete"] and res["best_softmax"] == {"prose": "dpa+gate", "code": "dpa+gate"}
    assert res["lr"]["code"]["ea[h2]"] == 2e-3
    assert res["gap"]["ea-power6"] == pytest.approx(0.07)
    assert res["kept"]["ea-power8"]["pointer"] == pytest.approx(0.625)
    # keep >= 75% on both rungs: power4 (87.5%), power6 (75%), ea+gate, ea[h2]; by gap: power6 +0.07,
    # power4 +0.12, ea[h2] +0.17 (ea+gate +0.22 is fourth); the odd control (best text) is never selected
    assert res["finalists"] == ["ea-power6", "ea-power4", "ea[h2]"]
    jobs = study.final_jobs(res, "OUT")
    assert len(jobs) == 2 * 4 * (2 + 3)  # corpora x (3 finalists + best softmax) x (2 + 3 seeds)
    assert ("lm --threads 1 --corpus prose --lr 0.002 --seeds 1 --steps 300 --out OUT/prose-300 "
            "--kinds ea --variants power6") in jobs
    assert any("--steps 1200 --eval-every 100 --out OUT/code-1200 --kinds dpa --gate on" in j for j in jobs)
    table = study.table(res)
    assert len(table) == 2 + len(study.MECHANISMS) + 2 and "| C2 | ea-power6 | 2.050 (0.002) |" in table[5]


def test_no_finalists_while_a_mechanism_is_missing(tmp_path):
    res = study.select(_records(tmp_path, drop="ea[first]"))
    assert not res["complete"] and res["finalists"] is None
    with pytest.raises(SystemExit, match="not complete"):
        study.main(["final", str(tmp_path / "q"), "--out", str(tmp_path)])


def _final_records(tmp_path: Path, res: dict, drop_seed: int | None = None) -> None:
    """Finalists' and the best softmax's 300/1200-step runs: at 1200 steps ea-power6 is 0.005 behind the
    best softmax (within 0.01), ea-power4 0.02 behind, ea[h2] 0.05 behind; seeds spread by +-0.002."""
    behind = {"ea-power6": 0.005, "ea-power4": 0.02, "ea[h2]": 0.05, "dpa+gate": 0.0}
    for steps, base in ((300, 2.0), (1200, 1.5)):
        for c in study.CORPORA:
            _write(tmp_path / f"{c}-{steps}", [
                {"kind": m, "lr": res["lr"][c][m], "seed": s, "val_bpb": base + d + 0.002 * (s - 1)}
                for m, d in behind.items() for s in study.SEEDS if s != drop_seed] + [
                {"kind": "dpa", "lr": 4e-3, "seed": 0, "val_bpb": 9.9}],  # another lr: not the selected one
                append=True)  # the 300-step runs land beside the screen's, as in runs/levers/<corpus>-300


def test_final_stage_table_target_and_size_step(tmp_path):
    out = _records(tmp_path)
    res = study.select(out)
    _final_records(out, res)
    fin = study.final(out, res)
    assert fin["complete"]
    g = fin["rows"][(1200, "prose", "ea-power6")]["gap"]
    assert g.estimate == pytest.approx(0.005) and g.n == (3, 3)
    assert fin["target"]["ea-power6"] == {"text": True, "ladder": True, "met": True}
    assert fin["target"]["ea-power4"]["text"] is False and not fin["target"]["ea-power4"]["met"]
    assert fin["size_candidate"] == "ea-power6"
    jobs = study.size_jobs(res, fin, "OUT")
    assert len(jobs) == 2 * 2 * 3  # corpora x (candidate + best softmax) x seeds
    assert ("lm --threads 1 --corpus code --lr 0.002 --seeds 2 --steps 1200 --eval-every 100 --d-model 256 "
            "--out OUT/code-1200-d256 --kinds ea --variants power6") in jobs
    table = study.final_table(res, fin)
    assert any(r.startswith("| prose | 1200 | ea-power6 | 0.002 | 3 | 1.505 ± 0.002 | +0.005 [") for r in table)
    assert "| ea-power6 | yes | yes | MET |" in table


def test_no_size_step_while_the_final_stage_is_incomplete(tmp_path):
    out = _records(tmp_path)
    res = study.select(out)
    _final_records(out, res, drop_seed=2)
    fin = study.final(out, res)
    assert not fin["complete"] and fin["size_candidate"] is None
    # power6 (ladder kept) still has 2 seeds: its gap is computed, so the rule can already be read;
    # with no 1200-step runs at all the verdict is pending for a candidate that keeps the ladder lead
    _write(out / "prose-1200", [])
    fin = study.final(out, res)
    assert fin["target"]["ea-power6"]["met"] is None and "pending" in "\n".join(study.final_table(res, fin))
    res["kept"]["ea-power6"] = {"pointer": 0.5, "lagged_digits": 0.9}  # below 75% on one rung: cannot be met
    assert study.final(out, res)["target"]["ea-power6"]["met"] is False
    with pytest.raises(SystemExit, match="final stage is not complete"):
        study.main(["size", str(tmp_path / "q"), "--out", str(out)])


def test_the_docs_table_is_the_committed_records():
    """docs/levers.md's screen + ladder table is what `study.py select` makes of docs/records/levers."""
    root = Path(__file__).parents[2]
    res = study.select(root / "docs" / "records" / "levers")
    assert res["complete"] and res["finalists"] == ["ea-power4", "ea-exp_squared+gate", "ea+gate"]
    doc = (root / "docs" / "levers.md").read_text()
    section = doc.split("## The screen and the ladder stage")[1]
    assert "\n".join(study.table(res)) in section


def test_one_complete_corpus_outside_the_margin_decides_the_text_rule(tmp_path):
    out = _records(tmp_path)
    res = study.select(out)
    _final_records(out, res)
    (out / "code-1200" / "results.jsonl").write_text("")  # code's 1200-step runs not run yet
    fin = study.final(out, res)
    assert fin["target"]["ea-power4"]["text"] is False  # prose: +0.02 with all seeds, outside 0.01
    assert fin["target"]["ea-power6"]["text"] is None and fin["target"]["ea-power6"]["met"] is None  # +0.005: code decides


def test_size_step_rows_beside_the_d_model_128_gap(tmp_path):
    out = _records(tmp_path)
    res = study.select(out)
    _final_records(out, res)
    fin = study.final(out, res)
    assert study.size_step(out, res, {**fin, "size_candidate": None})["candidate"] is None
    # d_model 256: power6 0.004 behind on prose; code has only two seeds of power6 so far
    _write(out / "prose-1200-d256", [{"kind": m, "lr": res["lr"]["prose"][m], "seed": s, "val_bpb": 1.4 + d + 0.002 * s}
                                     for m, d in (("ea-power6", 0.004), ("dpa+gate", 0.0)) for s in study.SEEDS])
    _write(out / "code-1200-d256", [{"kind": m, "lr": res["lr"]["code"][m], "seed": s, "val_bpb": 1.4 + d + 0.002 * s}
                                    for m, d in (("ea-power6", 0.03), ("dpa+gate", 0.0)) for s in study.SEEDS
                                    if (m, s) != ("ea-power6", 2)])
    sz = study.size_step(out, res, fin)
    assert sz["candidate"] == "ea-power6" and not sz["complete"]
    r = sz["rows"][("prose", "ea-power6")]
    assert r["n"] == 3 and r["gap"].estimate == pytest.approx(0.004) and r["gap128"].estimate == pytest.approx(0.005)
    assert r["change"].estimate == pytest.approx(0.004 - 0.005) and r["change"].n == (3, 3, 3, 3)
    assert sz["rows"][("code", "ea-power6")]["n"] == 2
    assert sz["rows"][("code", "ea-power6")]["gap"].estimate == pytest.approx(0.03 + 0.001 - 0.002)  # seeds 0, 1 vs 0-2
    table = study.size_table(res, sz)
    assert table[2].startswith("| prose | ea-power6 | 0.002 | 3 | 1.406 ± 0.002 | +0.004 [")
    assert " | -0.001 [" in table[2] and table[2].count("[") == 3  # gap at 256, at 128, and its change
    assert "(the bar)" in table[3] and len(table) == 2 + 2 * len(study.CORPORA)
    pareto = study.pareto_table(res, fin, sz)
    row = next(x for x in pareto if "| ea-power6 |" in x)
    assert "| +0.005 / +0.005 | +0.004 / +0.029 |" in row  # 1200 steps at d_model 128, then 256


def test_pareto_front_and_table(tmp_path):
    assert study.pareto_front({"a": (0.1, 1.0, 1.0), "b": (0.0, 0.0, 0.0), "c": (0.2, 0.5, 1.0),
                               "d": (0.1, 1.0, 1.0)}) == {"a", "b", "d"}  # c: a is better everywhere; ties stay
    out = _records(tmp_path)
    res = study.select(out)
    table = study.pareto_table(res, {})  # before the final stage: screen and ladder only
    assert len(table) == 2 + len(study.MECHANISMS)
    odd = next(x for x in table if "| ea-exp_odd |" in x)
    assert odd.startswith("| C5 | ea-exp_odd | -0.080 / -0.080 | - | - | - | 0% | 0% |")
    # the odd control: the best text (-0.08), no lead; ea-power6 +0.07, 75% / 75%: both on the front;
    # ea[first] (+0.14, 50%) is behind ea-power6 on all three measures
    assert odd.endswith("| yes |") and next(x for x in table if "| ea-power6 |" in x).endswith("| yes |")
    assert next(x for x in table if "| ea[first] |" in x).endswith("|  |")
    _final_records(out, res)
    fin = study.final(out, res)
    table = study.pareto_table(res, fin)
    assert "| S1 | dpa+gate | +0.000 / +0.000 | (the bar) | (the bar) | - |" in "\n".join(table)
    assert "| C1 | ea-power4 | +0.120 / +0.120 | +0.020 / +0.020 | +0.020 / +0.020 | - | 88% | 88% |" in "\n".join(table)


def test_the_docs_final_size_and_pareto_tables_are_the_committed_records():
    """docs/levers.md's final-stage, size-step and Pareto tables, and docs/real-text.md's Pareto table, are what
    `study.py report` makes of docs/records/levers (regenerated at every snapshot of the records)."""
    root = Path(__file__).parents[2]
    out = root / "docs" / "records" / "levers"
    res = study.select(out)
    fin = study.final(out, res)
    sz = study.size_step(out, res, fin)
    assert fin["complete"] and sz["complete"] and sz["candidate"] == "ea-exp_squared+gate"
    levers = (root / "docs" / "levers.md").read_text().split("## Final stage")[1]
    assert "\n".join(study.final_table(res, fin)) in levers
    assert "\n".join(study.size_table(res, sz)) in levers
    pareto = "\n".join(study.pareto_table(res, fin, sz))
    assert pareto in levers
    assert pareto in (root / "docs" / "real-text.md").read_text()


def test_report_draws_the_pareto_figure(tmp_path, capsys):
    out = _records(tmp_path / "runs")
    _final_records(out, study.select(out))
    png = tmp_path / "pareto.png"
    study.main(["report", "--out", str(out), "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "size-step candidate: ea-power6" in printed and "Pareto table:" in printed
