"""`ea lm` on a tiny model and a small local text (CPU, seconds)."""
from __future__ import annotations

import csv
import json
import math

import pytest

pytest.importorskip("transformers")
from expressive_attention import cli  # noqa: E402
from expressive_attention.experiments import text_lm  # noqa: E402

TEXT = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int = 0\n    y: int = 0\n" * 40)


def tiny(tmp_path, **kw):
    (tmp_path / "text").mkdir(exist_ok=True)
    for i in range(4):
        (tmp_path / "text" / f"f{i}.py").write_text(TEXT[i * 100:] + TEXT[: i * 100])
    (tmp_path / "text" / "skip.txt").write_text("not python\n" * 100)
    base = dict(paths=[str(tmp_path / "text")], d_model=32, layers=1, heads=2, kv_heads=1, context=16,
                batch_size=4, steps=6, lr=1e-2, eval_every=3, eval_windows=8, out=str(tmp_path / "out"),
                threads=1)
    return text_lm.TextLMConfig(**{**base, **kw})


def test_lm_run_writes_curves_and_compares(tmp_path):
    cfg = tiny(tmp_path)
    summary = text_lm.run(cfg, progress=False, log=lambda *_: None)
    assert summary["files"] == 4 and summary["vocab"] == 256
    rows = list(csv.DictReader(open(tmp_path / "out" / "lm_curves.csv")))
    assert [r["kind"] for r in rows] == ["dpa"] * 3 + ["ea"] * 3
    assert [r["attn_implementation"] for r in rows] == ["sdpa"] * 3 + ["expressive"] * 3
    assert [int(r["step"]) for r in rows] == [0, 3, 6] * 2
    for r in rows:  # byte-level: bits per byte = nats per token / ln 2
        assert math.isclose(float(r["val_bpb"]), float(r["val_loss"]) / math.log(2), rel_tol=1e-9)
    for kind in ("dpa", "ea"):
        r = [x for x in rows if x["kind"] == kind]
        assert float(r[-1]["val_loss"]) < float(r[0]["val_loss"])  # it learns
    assert (tmp_path / "out" / "lm_curves.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "lm_summary.json").read_text())
    assert set(saved["results"]) == {"dpa", "ea"}
    assert saved["results"]["ea"]["val_loss"] != saved["results"]["dpa"]["val_loss"]
    assert "| ea |" in text_lm.format_table(summary)


def test_lm_is_reproducible_and_char_level(tmp_path):
    runs = [text_lm.run(tiny(tmp_path, kinds=("ea",), variants=("squared",), steps=3), progress=False,
                        log=lambda *_: None) for _ in range(2)]
    a, b = (r["results"]["ea-squared"] for r in runs)
    assert a["attn_implementation"] == "expressive_squared"
    assert (a["val_loss"], a["val_bpb"]) == (b["val_loss"], b["val_bpb"])
    c = text_lm.run(tiny(tmp_path, tokenizer="char", kinds=("dpa",), steps=2), progress=False, log=lambda *_: None)
    assert c["vocab"] == len(set(TEXT)) + 1


def test_held_out_split_and_files(tmp_path):
    cfg = tiny(tmp_path, max_bytes=2500, val_fraction=0.2)
    train, val, n = text_lm.load_text(cfg)
    assert len(train) + len(val) <= 2500 + n and abs(len(val) - 0.2 * (len(train) + len(val))) <= 1
    assert all(f.suffix == ".py" for f in text_lm.collect_files(cfg.paths, cfg.glob))


@pytest.mark.parametrize("bad", [dict(tokenizer="word"), dict(kinds=("softmax",)), dict(variants=("cubic",)), dict(arch="bert"),
                                 dict(heads=3), dict(steps=0), dict(val_fraction=1.5), dict(paths=["/nonexistent"])])
def test_bad_config_raises(tmp_path, bad):
    with pytest.raises((ValueError, FileNotFoundError)):
        text_lm.run(tiny(tmp_path, **bad), progress=False, log=lambda *_: None)


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
        cli.main(["lm", "--impls", "softmax"])


def test_impls_and_lmconfig_are_deprecated_names(tmp_path):
    with pytest.warns(DeprecationWarning, match="kinds"):
        cfg = text_lm.TextLMConfig(impls=("sdpa", "expressive_squared"))
    assert (cfg.kinds, cfg.variants) == (("dpa", "ea"), ("squared",))
    assert [label for label, _, _ in cfg.runs()] == ["dpa", "ea-squared"]
    with pytest.warns(DeprecationWarning, match="TextLMConfig"):
        assert text_lm.LMConfig is text_lm.TextLMConfig
    cfg = tiny(tmp_path)
    with pytest.warns(DeprecationWarning, match="--kinds"):
        rc = cli.main(["lm", *cfg.paths, "--impls", "expressive_squared", "--steps", "1", "--eval-every", "1",
                       "--d-model", "32", "--layers", "1", "--context", "16", "--batch-size", "2", "--threads", "1",
                       "--arch", "gpt2", "--out", str(tmp_path / "old")])
    assert rc == 0
    assert list(json.loads((tmp_path / "old" / "lm_summary.json").read_text())["results"]) == ["ea-squared"]
