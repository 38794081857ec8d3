"""Synthetic ladder records for the statistics tests (tests/experiments, tests/bench)."""


def synthetic_record(label, seed, steps, d_model, params, tok, seq, axes, point):
    """One ladder record: mechanism `label`, token / sequence accuracy `tok` / `seq`, on the preset's `axes`
    at `point` (the RunConfig fields that differ from the base; {} at the base)."""
    return {"key": f"{label}{seed}{steps}{d_model}", "label": label, "steps": steps, "params": params,
            "config": {"seed": seed, "d_model": d_model},
            "metrics": {"token_acc": tok, "seq_acc": seq},
            "ladder": {"preset": "syn", "family": "fam", "rung": 0, "rung_label": "K=2", "axes": axes, "point": point}}
