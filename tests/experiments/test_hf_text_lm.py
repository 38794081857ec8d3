"""`ea lm` on a tiny model and a small local text (CPU, seconds)."""
from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("transformers")
from expressive_attention import cli  # noqa: E402
from expressive_attention.experiments import text_data, text_lm, text_study  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int = 0\n    y: int = 0\n" * 40)


def tiny(tmp_path, **kw):
    (tmp_path / "text").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "text" / f"f{i}.py").write_text(TEXT[i * 100:] + TEXT[: i * 100])
    (tmp_path / "text" / "skip.txt").write_text("not python\n" * 100)
    base = dict(paths=[str(tmp_path / "text")], d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, context_length=16,
                batch_size=4, steps=6, lrs=(1e-2,), eval_every=3, eval_windows=8, out=str(tmp_path / "out"),
                threads=1)
    return text_lm.TextLMConfig(**{**base, **kw})


def test_lm_run_writes_curves_and_compares(tmp_path):
    cfg = tiny(tmp_path)
    summary = text_study.run(cfg, progress=False, log=lambda *_: None)
    assert summary["files"] == 4 and summary["vocab"] == 256
    rows = list(csv.DictReader(open(tmp_path / "out" / "lm_curves.csv")))
    assert [r["label"] for r in rows] == ["dpa"] * 3 + ["ea"] * 3
    assert [r["attn_implementation"] for r in rows] == ["sdpa"] * 3 + ["expressive"] * 3
    assert {(r["lr"], r["seed"]) for r in rows} == {("0.01", "0")}
    assert [int(r["step"]) for r in rows] == [0, 3, 6] * 2
    for r in rows:  # byte-level: bits per byte = nats per token / ln 2
        assert math.isclose(float(r["val_bpb"]), float(r["val_loss"]) / math.log(2), rel_tol=1e-9)
    for label in ("dpa", "ea"):
        r = [x for x in rows if x["label"] == label]
        assert float(r[-1]["val_loss"]) < float(r[0]["val_loss"])  # it learns
    assert (tmp_path / "out" / "lm_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "lm_summary.json").read_text())
    assert set(saved["results"]) == {"dpa", "ea"}
    assert saved["results"]["ea"]["val_loss"] != saved["results"]["dpa"]["val_loss"]
    assert "| ea |" in text_study.format_table(summary)


def test_lm_is_reproducible_and_char_level(tmp_path):
    runs = [text_study.run(tiny(tmp_path, kinds=("ea",), variants=("squared",), steps=3), progress=False,
                        log=lambda *_: None) for _ in range(2)]
    a, b = (r["results"]["ea-squared"] for r in runs)
    assert a["attn_implementation"] == "expressive_squared"
    assert (a["val_loss"], a["val_bpb"]) == (b["val_loss"], b["val_bpb"])
    c = text_study.run(tiny(tmp_path, tokenizer="char", kinds=("dpa",), steps=2), progress=False, log=lambda *_: None)
    assert c["vocab"] == len(set(TEXT)) + 1


def test_held_out_split_and_files(tmp_path):
    cfg = tiny(tmp_path, max_bytes=2500, val_fraction=0.2)
    train, val, n = text_data.load_text(cfg)
    assert len(train) + len(val) <= 2500 + n and abs(len(val) - 0.2 * (len(train) + len(val))) <= 1
    assert all(f.suffix == ".py" for f in text_data.collect_files(cfg.paths, cfg.glob))


@pytest.mark.parametrize("bad", [dict(tokenizer="word"), dict(kinds=("softmax",)), dict(variants=("cubic",)), dict(arch="bert"),
                                 dict(n_heads=3), dict(steps=0), dict(val_fraction=1.5), dict(paths=["/nonexistent"]),
                                 dict(corpus="poetry"), dict(corpus="prose"), dict(lrs=()), dict(lrs=(2.0,)),
                                 dict(seeds=(0, 0)), dict(seeds=(-1,)), dict(variants=("power", "power4")),
                                 dict(variants=("power0.5",)), dict(scales=("sometimes",))])
def test_bad_config_raises(tmp_path, bad):
    with pytest.raises((ValueError, FileNotFoundError)):
        text_study.run(tiny(tmp_path, **bad), progress=False, log=lambda *_: None)


def test_cli(tmp_path, capsys):
    cfg = tiny(tmp_path)
    rc = cli.main(["lm", *cfg.paths, "--steps", "2", "--eval-every", "1", "--d-model", "32", "--layers", "1",
                   "--context", "16", "--batch-size", "2", "--threads", "1", "--arch", "gpt2",
                   "--out", str(tmp_path / "cli")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| dpa |" in out and "| ea |" in out
    assert (tmp_path / "cli" / "lm_curves.csv").exists()
    with pytest.raises(SystemExit):
        cli.main(["lm", "--impls", "sdpa"])  # gone: --kinds and --variants


def test_mechanisms_by_name():
    cfg = text_lm.TextLMConfig(variants=("saturating", "power", "power8", "exp_squared"), scales=("fixed", "learned"))
    labels = [m.label for m in cfg.runs()]
    assert labels == ["dpa", "ea", "ea-power4", "ea-power8", "ea-exp_squared",
                      "dpa+gain", "ea+gain", "ea-power4+gain", "ea-power8+gain", "ea-exp_squared+gain"]
    impls = [text_lm.hf_implementation(m) for m in cfg.runs()]
    assert impls[:5] == ["sdpa", "expressive", "expressive_power4", "expressive_power8", "expressive_exp_squared"]
    assert impls[5] == "softmax_gain" and impls[-1] == "expressive_exp_squared_gain"
    assert [text_lm.label_of_impl(i) for i in impls] == labels


def test_seeds_and_lrs_study_resumes_and_reports(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, variants=("power",), seeds=(0, 1), lrs=(1e-2, 3e-3), steps=3, eval_every=3)
    summary = text_study.run(cfg, progress=False, log=lambda *_: None)
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 8 and summary["records"] == 8
    grid = {(r["label"], r["lr"]): r for r in summary["grid"]}
    cell = grid[("dpa", 1e-2)]
    assert cell["n"] == 2 and cell["seeds"] == [0, 1] and cell["val_bpb"][0] != cell["val_bpb"][1]
    assert math.isclose(cell["mean"], sum(cell["val_bpb"]) / 2)
    assert math.isclose(cell["std"], abs(cell["val_bpb"][0] - cell["val_bpb"][1]) / math.sqrt(2))
    for label, best in summary["results"].items():  # the lr selected on seed 0
        seed0 = {r["lr"]: r["val_bpb"][0] for r in summary["grid"] if r["label"] == label}
        assert best["lr"] == min(seed0, key=seed0.get)
    assert "gap" in summary["verdict"] and "provisional" in summary["verdict"] and "ea-power4" in summary["verdict"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| ea-power4 |" in report and "± " in report and "top-key weight" in report
    rec = json.loads(lines[0])
    layers = rec["diagnosis"]["final"]
    assert len(layers) == 1 and 0 < layers[0]["top_weight"] <= 1 and layers[0]["abs_s_max"] > 0
    from expressive_attention.experiments.attention_stats import COUNTERFACTUALS  # softmax + the variant table

    assert set(layers[0]["top_weight_if"]) == set(COUNTERFACTUALS) >= {"softmax", "saturating", "power4", "exp_odd"}
    # resume: the same command trains nothing; one more seed trains only the new runs
    monkeypatch.setattr(text_study, "train_one", lambda *a, **k: pytest.fail("a finished run was redone"))
    again = text_study.run(cfg, progress=False, log=lambda *_: None)
    assert again["grid"] == summary["grid"]
    monkeypatch.undo()
    more = text_study.run(tiny(tmp_path, kinds=("dpa",), seeds=(2,), lrs=(1e-2,), steps=3, eval_every=3),
                       progress=False, log=lambda *_: None)
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 9
    assert {(r["label"], r["lr"]): r["n"] for r in more["grid"]}[("dpa", 1e-2)] == 3


def test_prose_corpus_is_english_from_pydoc_topics(tmp_path):
    cfg = text_lm.TextLMConfig(corpus="prose", max_bytes=200_000, context_length=64)
    train, val, n = text_data.load_text(cfg)
    assert n > 10 and len(train) + len(val) >= 190_000
    text = train.decode()
    assert "the" in text.split() and "def " not in text[:2000]
    assert text_data.load_text(cfg) == (train, val, n)  # fixed order


def test_cli_seeds_lrs_scales(tmp_path, capsys):
    cfg = tiny(tmp_path)
    rc = cli.main(["lm", *cfg.paths, "--steps", "2", "--eval-every", "2", "--d-model", "32", "--layers", "1",
                   "--context", "16", "--batch-size", "2", "--threads", "1", "--seeds", "0,1", "--lr", "1e-2,2e-3",
                   "--variants", "exp_squared", "--scales", "fixed,learned", "--no-diagnose",
                   "--out", str(tmp_path / "cli")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| ea-exp_squared+gain |" in out and "| dpa+gain |" in out and "lr 0.002" in out and "gap" in out
    assert len((tmp_path / "cli" / "results.jsonl").read_text().splitlines()) == 16
    with pytest.raises(SystemExit):
        cli.main(["lm", "--seeds", "a,b"])


def test_learned_gain_mechanisms_train_their_gain(tmp_path):
    cfg = tiny(tmp_path, variants=("exp_squared",), scales=("learned",), steps=3, eval_every=3)
    text_study.run(cfg, progress=False, log=lambda *_: None)
    recs = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["label"] for r in recs] == ["dpa+gain", "ea-exp_squared+gain"]
    for r in recs:
        init, final = r["diagnosis"]["init"][0]["gain"], r["diagnosis"]["final"][0]["gain"]
        assert init == [1.0, 1.0] and final != init  # exp(0) at init, learned after


@pytest.mark.parametrize("study", ["code-300", "code-1200"])
def test_committed_old_records_keep_their_keys_and_labels(study, tmp_path):
    """docs/records/real-text was written with TextLMConfig(layers, heads, kv_heads, context) and
    records naming the HF implementation `impl` (code-300: without a label): results.TEXT_KEY_NAMES
    maps the setting to today's names, and the same config hashes to the stored key (a rerun resumes)."""
    from pathlib import Path

    from expressive_attention.experiments.results import TEXT_KEY_NAMES, ResultsStore, current_names

    path = Path(__file__).parents[2] / "docs" / "records" / "real-text" / study / "results.jsonl"
    records = ResultsStore(path).read()
    assert records
    for r in records:
        cfg = text_lm.TextLMConfig(**current_names(r["setting"], TEXT_KEY_NAMES))
        assert text_lm.setting(cfg) == r["setting"]
        assert text_lm.run_key(cfg, r["attn_implementation"], r["lr"], r["seed"]) == r["key"]
    rows = text_study.grid(records)
    assert {row["label"] for row in rows} >= {"dpa", "ea-exp_squared"}
    from dataclasses import asdict

    summary = dict(config=asdict(cfg), runs=[], corpus="code", tokens_per_run=1, train_bytes=1, val_bytes=1,
                   torch="t", transformers="t", threads=1)
    summary = text_study.write_outputs(records, summary, tmp_path)  # the study's summary of old records
    assert "dpa" in summary["results"] and "| dpa |" in (tmp_path / "report.md").read_text()
    with open(tmp_path / "lm_curves.csv") as f:
        assert {r["label"] for r in csv.DictReader(f)} >= {"dpa", "ea-exp_squared"}
