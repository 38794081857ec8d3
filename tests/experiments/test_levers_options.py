"""Issue #21's options in the experiments: parsing and labels, RunConfig keys (unchanged when off),
preset levers, and one tiny `ea ladder` / `ea lm` run with every flag (each value its own run)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from ladder_tiny_tasks import tiny_preset  # registers "tiny_lag"

from expressive_attention.cli import main
from expressive_attention.experiments import ResultsStore
from expressive_attention.experiments.kinds import (
    mechanism_label, parse_ea_heads, parse_gate, parse_layer_kinds, parse_scale, parse_variant, resolve_layer_kinds,
)
from expressive_attention.experiments.presets import ladder_grid
from expressive_attention.experiments.results import config_key
from expressive_attention.experiments.train import RunConfig, build_model

torch.set_num_threads(1)
G0 = -1.1513  # 0.5 ln 0.1, about


def test_parsing():
    assert parse_scale("fixed") == (False, 0.0) and parse_scale("learned") == (True, 0.0)
    assert parse_scale("learned@-1.1513") == (True, -1.1513)
    assert parse_gate("on") == (True, 0.0) and parse_gate("off") == (False, 0.0)
    assert parse_gate("on@4") == (True, 4.0) and parse_gate("on@-0.5") == (True, -0.5)
    assert parse_ea_heads("all") is None and parse_ea_heads("2") == 2 and parse_ea_heads("0") == 0
    assert parse_layer_kinds("all") is None and parse_layer_kinds("ends") == "ends"
    assert parse_layer_kinds("dpa-ea-ea-dpa") == "dpa-ea-ea-dpa"
    assert resolve_layer_kinds("ends", 4) == ("dpa", "ea", "ea", "dpa")
    assert resolve_layer_kinds("first", 4) == ("dpa", "ea", "ea", "ea")
    assert resolve_layer_kinds("last", 2) == ("ea", "dpa")
    assert resolve_layer_kinds("dpa-ea", 2) == ("dpa", "ea") and resolve_layer_kinds(None, 3) is None
    assert parse_variant("power6") == ("power", 6.0) and parse_variant("exp_squared") == ("exp_squared", None)
    for bad, fn in (("learned@x", parse_scale), ("sometimes", parse_scale), ("maybe", parse_gate),
                    ("on@x", parse_gate), ("on@inf", parse_gate), ("off@4", parse_gate),
                    ("two", parse_ea_heads), ("-1", parse_ea_heads), ("ea-softmax", parse_layer_kinds),
                    ("middle", parse_layer_kinds), ("cubic", parse_variant)):
        with pytest.raises(ValueError):
            fn(bad)
    with pytest.raises(ValueError, match=">= 3 layers"):
        resolve_layer_kinds("ends", 2)
    with pytest.raises(ValueError, match="3 kinds for 4 layers"):
        resolve_layer_kinds("dpa-ea-ea", 4)


def test_variant_names_pass_through(monkeypatch):
    """Any variant the op knows is accepted by name (e.g. one added to the op's table later)."""
    from expressive_attention.ops import reference

    monkeypatch.setattr(reference, "VARIANTS", (*reference.VARIANTS, "exp_odd"))
    assert parse_variant("exp_odd") == ("exp_odd", None)


def test_labels():
    assert mechanism_label("ea", forget_gate=True) == "ea+gate"
    assert mechanism_label("dpa", forget_gate=True) == "dpa+gate"
    assert mechanism_label("ea", "exp_squared", learn_scale=True, gain_init=G0) == "ea-exp_squared+gain@-1.1513"
    assert mechanism_label("ea", n_ea_heads=2) == "ea[h2]"
    assert mechanism_label("ea", layer_kinds="dpa-ea-ea-dpa") == "ea[dpa-ea-ea-dpa]"
    assert mechanism_label("ea", n_ea_heads=2, layer_kinds="ends", learn_scale=True, forget_gate=True) == \
        "ea[h2][ends]+gain+gate"


def test_runconfig_keys_unchanged_when_off():
    base = dict(task="pointer", task_params={"T": 8}, kind="ea")
    plain = RunConfig(**base)
    off = RunConfig(**base, gain_init=0.0, n_ea_heads=None, layer_kinds=None, forget_gate=False)
    assert off.to_dict() == plain.to_dict() and off.key() == plain.key()
    for name in ("gain_init", "n_ea_heads", "layer_kinds", "forget_gate"):
        assert name not in plain.to_dict()
    on = RunConfig(**base, learn_scale=True, gain_init=G0, n_ea_heads=2, layer_kinds="first", forget_gate=True)
    d = on.to_dict()
    assert (d["gain_init"], d["n_ea_heads"], d["layer_kinds"], d["forget_gate"]) == (G0, 2, "first", True)
    assert on.label == "ea[h2][first]+gain@-1.1513+gate"
    assert RunConfig.from_dict(d) == on and on.key() != plain.key()
    assert RunConfig(**base, n_ea_heads=0).key() != plain.key()  # 0 EA heads is not "off"


@pytest.mark.parametrize("kw,match", [
    (dict(kind="dpa", n_ea_heads=2), "kind='ea' only"),
    (dict(kind="dpa", layer_kinds="first"), "kind='ea' only"),
    (dict(layer_kinds="ends"), ">= 3 layers"),
    (dict(layer_kinds="bogus"), "layer-kinds"),
    (dict(gain_init=-1.0), "learn_scale=True"),
    (dict(gate_bias_init=4.0), "forget_gate=True"),
])
def test_runconfig_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        RunConfig(task="pointer", **kw)


def test_build_model_with_levers():
    from expressive_attention.tasks import make_task

    task = make_task("pointer", T=4)
    cfg = RunConfig(task="pointer", task_params={"T": 4}, n_layers=3, layer_kinds="ends", n_ea_heads=2,
                    forget_gate=True, learn_scale=True, gain_init=G0, variant="exp_squared")
    model = build_model(cfg, task)
    assert [b.attn.kind for b in model.blocks] == ["dpa", "ea", "dpa"]
    assert model.blocks[1].attn.n_ea_heads == 2 and model.blocks[0].attn.forget_gate
    assert torch.allclose(model.blocks[0].attn.log_gain, torch.full((4,), G0))


def test_preset_levers_and_power_degrees():
    preset, grid = ladder_grid("verify", families=["pointer"], seeds=1, axes=[], variants=["saturating", "power6"],
                               levers={"gate": [{}, {"forget_gate": True}], "ea_heads": [{}, {"n_ea_heads": 2}]})
    labels = [p.config.label for p in grid]
    assert labels == ["dpa", "dpa+gate", "ea", "ea[h2]", "ea+gate", "ea[h2]+gate",
                      "ea-power6", "ea-power6[h2]", "ea-power6+gate", "ea-power6[h2]+gate"]
    assert all(p.config.steps == 450 and p.config.d_model == 64 for p in grid)  # the base point only
    assert grid[6].config.power == 6.0
    # no levers: the same runs (and keys) as before the levers existed
    _, plain = ladder_grid("verify")
    _, empty = ladder_grid("verify", levers={})
    assert [p.config.key() for p in plain] == [p.config.key() for p in empty]
    with pytest.raises(ValueError, match="unknown axes"):
        ladder_grid("verify", axes=["depth"])
    _, deep = ladder_grid("verify", families=["pointer"], seeds=1, axes=[], n_layers=4,
                          levers={"layer_kinds": [{"layer_kinds": "ends"}]})
    assert [p.config.label for p in deep] == ["dpa", "ea[ends]", "ea-squared[ends]"]
    assert all(p.config.n_layers == 4 for p in deep)


def test_ladder_cli_every_flag(tmp_path, capsys):
    pf = tmp_path / "tiny.json"
    preset = tiny_preset(name="levers", seeds=1).to_dict()
    preset["base"].update(n_layers=2, n_heads=4)
    pf.write_text(json.dumps(preset))
    flags = ["--variants", "saturating,exp_squared", "--gate", "off,on", "--ea-heads", "all,2",
             "--layer-kinds", "all,last", "--scales", "fixed,learned@-1.1513"]
    assert main(["ladder", "--preset", str(pf), "--tasks", "tiny", "--list", *flags]) == 0
    listed = capsys.readouterr().out
    # per rung: dpa x 2 scales x 2 gates = 4; ea: 2 variants x 2 x 2 x 2 heads x 2 layer kinds = 32
    assert "108 runs" in listed and "ea-exp_squared[h2][last]+gain@-1.1513+gate" in listed
    out = tmp_path / "o"
    run = ["ladder", "--preset", str(pf), "--out", str(out), "--steps", "2", "--workers", "1", "--no-checkpoints",
           "--variants", "exp_squared", "--gate", "on", "--ea-heads", "2", "--layer-kinds", "last",
           "--scales", "learned@-1.1513"]
    assert main(run) == 0
    recs = ResultsStore(out).read()
    assert len(recs) == 6
    assert {r["label"] for r in recs} == {"dpa+gain@-1.1513+gate", "ea-exp_squared[h2][last]+gain@-1.1513+gate"}
    capsys.readouterr()
    assert main(run) == 0  # resumes: nothing left to run
    assert "0 runs trained, 6 already done" in capsys.readouterr().out
    for bad in (["--gate", "maybe"], ["--scales", "learned@x"], ["--layer-kinds", "ends"], ["--ea-heads", "two"]):
        code = None
        try:
            code = main(["ladder", "--preset", str(pf), "--list", *bad])
        except SystemExit as e:  # argparse's own choices
            code = e.code
        assert code == 2, bad


pytest.importorskip("transformers")


def _text(tmp_path):
    text = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int = 0\n" * 40) * 2
    (tmp_path / "text").mkdir(exist_ok=True)
    (tmp_path / "text" / "a.py").write_text(text)
    return str(tmp_path / "text")


def test_lm_runs_and_keys(tmp_path):
    from expressive_attention.experiments import text_lm

    cfg = text_lm.TextLMConfig(kinds=("dpa", "ea"), variants=("saturating", "power8"), gates=("off", "on"),
                               ea_heads=("all", "2"), layer_kinds=("all", "first"), scales=("fixed", "learned@-1"))
    labels = [m.label for m in cfg.runs()]
    assert len(labels) == len(set(labels)) == 2 * 2 * (1 + 2 * 2 * 2)
    assert labels[:3] == ["dpa", "ea", "ea[first]"] and "dpa+gain@-1+gate" in labels
    impls = {m.label: text_lm.hf_implementation(m) for m in cfg.runs()}
    assert impls["dpa"] == "sdpa" and impls["dpa+gate"] == "softmax_gate"
    assert impls["ea+gate"] == "expressive_gate" and impls["ea[h2]"] == "expressive_hybrid"
    assert impls["ea-power8[h2][first]+gain@-1+gate"] == "expressive_power8_hybrid_gain_gate"
    # keys of runs without levers are computed as before
    plain = text_lm.TextLMConfig()
    for m in plain.runs():
        assert m.levers() == {}
        assert text_lm.run_key(plain, text_lm.hf_implementation(m), 2e-3, 0, m.levers()) == config_key(
            {**text_lm.setting(plain), "impl": text_lm.hf_implementation(m), "lr": 2e-3, "seed": 0})
    bad = text_lm.TextLMConfig(n_heads=4, n_kv_heads=2, ea_heads=("1",))
    with pytest.raises(ValueError, match="multiple of n_heads / n_kv_heads"):
        bad.check()
    with pytest.raises(ValueError, match=">= 3 layers"):
        text_lm.TextLMConfig(n_layers=2, layer_kinds=("ends",)).check()


def test_lm_cli_every_flag_and_resume(tmp_path, capsys, monkeypatch):
    from expressive_attention.experiments import text_study

    out = tmp_path / "lm"
    argv = ["lm", _text(tmp_path), "--d-model", "32", "--layers", "3", "--context", "16", "--batch-size", "2",
            "--steps", "2", "--eval-every", "2", "--threads", "1", "--out", str(out),
            "--variants", "exp_squared", "--gate", "on", "--ea-heads", "all,2", "--layer-kinds", "ends",
            "--scales", "learned@-1.1513"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    labels = [r["label"] for r in recs]
    assert labels == ["dpa+gain@-1.1513+gate", "ea-exp_squared[ends]+gain@-1.1513+gate",
                     "ea-exp_squared[h2][ends]+gain@-1.1513+gate"]
    assert all(math.isfinite(r["val_bpb"]) for r in recs)
    assert recs[2]["mechanism"]["n_ea_heads"] == 2 and recs[2]["attn_implementation"] == "expressive_exp_squared_hybrid_gain_gate"
    gain = recs[1]["diagnosis"]["init"][0]["gain"]
    assert gain == [round(math.exp(-1.1513), 4)] * 4
    assert "| dpa+gain@-1.1513+gate |" in printed
    monkeypatch.setattr(text_study, "train_one", lambda *a, **k: pytest.fail("a finished run was redone"))
    assert main(argv) == 0  # resume: every run is in results.jsonl


def test_gate_bias_init_in_configs_labels_and_flags():
    base = dict(task="pointer", task_params={"T": 4}, steps=5)
    plain = RunConfig(**base, forget_gate=True)
    on4 = RunConfig(**base, forget_gate=True, gate_bias_init=4)
    assert "gate_bias_init" not in plain.to_dict() and on4.to_dict()["gate_bias_init"] == 4.0
    assert RunConfig(**base, forget_gate=True, gate_bias_init=0.0).key() == plain.key()  # 0: the key of before
    assert on4.key() != plain.key() and RunConfig.from_dict(on4.to_dict()) == on4
    assert (plain.label, on4.label) == ("ea+gate", "ea+gate@4")
    assert mechanism_label("dpa", forget_gate=True, gate_bias_init=-1.5) == "dpa+gate@-1.5"
    from expressive_attention.tasks import make_task
    model = build_model(on4, make_task("pointer", T=4))
    assert all(torch.equal(b.attn.fgate_proj.bias, torch.full((4,), 4.0)) for b in model.blocks)
    from argparse import Namespace

    from expressive_attention.cli.args import lever_options
    args = Namespace(scales=None, gate=["off", "on", "on@4"], ea_heads=None, layer_kinds=None)
    assert lever_options(args)["gate"] == [{}, {"forget_gate": True}, {"forget_gate": True, "gate_bias_init": 4.0}]
