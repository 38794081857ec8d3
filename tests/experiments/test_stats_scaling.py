"""The ladder's statistics: Welch t-intervals against hand-computed cases, the capacity-equivalent
factor and the budget-axis verdicts on synthetic records."""
import math

import pytest

from expressive_attention.experiments.scaling import (
    analyse,
    category,
    scaling_rows,
    scaling_section,
)
from expressive_attention.experiments.stats import contrast_interval, equivalent_factor, gap_interval
from ladder_records import synthetic_record  # tests/support


def test_gap_interval_hand_computed_equal_variances():
    # EA 0.9, 0.8, 0.7: mean 0.8, s^2 0.01; DPA 0.6, 0.5, 0.4: mean 0.5, s^2 0.01.
    # se = sqrt(0.01/3 + 0.01/3) = 0.081650; Welch df = (0.02/3)^2 / (2 (0.01/3)^2 / 2) = 4;
    # t(0.975, 4) = 2.7764 (table) -> half width 0.22669: [0.07331, 0.52669]
    iv = gap_interval([0.9, 0.8, 0.7], [0.6, 0.5, 0.4])
    assert iv.estimate == pytest.approx(0.3)
    assert iv.df == pytest.approx(4.0)
    assert iv.low == pytest.approx(0.3 - 2.7764 * 0.081650, abs=1e-4)
    assert iv.high == pytest.approx(0.3 + 2.7764 * 0.081650, abs=1e-4)
    assert iv.sign == 1 and iv.n == (3, 3)


def test_gap_interval_unequal_variances_df_and_sign():
    # EA s^2 0.01, DPA 0.5, 0.5, 0.8: mean 0.6, s^2 0.03 -> se^2 = 0.04/3,
    # df = (0.04/3)^2 / ((0.01/3)^2/2 + (0.03/3)^2/2) = 3.2; t(0.975, 3.2) ~ 3.0 -> interval contains 0
    iv = gap_interval([0.9, 0.8, 0.7], [0.5, 0.5, 0.8])
    assert iv.estimate == pytest.approx(0.2)
    assert iv.df == pytest.approx(3.2)
    half = iv.high - iv.estimate
    assert half / math.sqrt(0.04 / 3) == pytest.approx(3.0, abs=0.15)  # between t(3) 3.18 and t(4) 2.78
    assert iv.sign == 0
    assert gap_interval([0.1, 0.2, 0.15], [0.8, 0.9, 0.85]).sign == -1


def test_zero_spread_gives_a_point_interval_and_errors_name_the_problem():
    iv = gap_interval([1.0, 1.0, 1.0], [0.5, 0.5, 0.5])
    assert (iv.low, iv.high, iv.df) == (0.5, 0.5, math.inf) and iv.sign == 1
    with pytest.raises(ValueError, match="needs >= 2 values"):
        gap_interval([1.0], [0.5, 0.6])
    with pytest.raises(ValueError, match="equal length"):
        contrast_interval([[1, 2]], [1, -1])


def test_gap_change_contrast():
    # (e1 - d1) - (e0 - d0) with every group s^2 = 0.01, n = 3: se = sqrt(4 * 0.01 / 3), df = 8
    g = [0.9, 0.8, 0.7]
    iv = contrast_interval([g, [x - 0.1 for x in g], g, [x - 0.3 for x in g]], [1, -1, -1, 1])
    assert iv.estimate == pytest.approx(-0.2)
    assert iv.df == pytest.approx(8.0)
    assert iv.high - iv.estimate == pytest.approx(2.3060 * math.sqrt(0.04 / 3), abs=1e-4)  # t(0.975, 8)


def test_equivalent_factor_interpolates_in_log_x():
    f = equivalent_factor([100, 300, 900], [0.5, 0.7, 0.9], target=0.8, x_ref=100)
    assert f.status == "reached"
    assert f.x == pytest.approx(300 * math.sqrt(3))  # halfway between 300 and 900 in log x
    assert f.factor == pytest.approx(3 * math.sqrt(3))
    assert equivalent_factor([100, 300, 900], [0.5, 0.6, 0.7], 0.8, 100).fmt() == "not reached (> 9x)"
    already = equivalent_factor([100, 300, 900], [0.85, 0.9, 0.95], 0.8, 300)
    assert already.status == "already" and already.factor == pytest.approx(1 / 3)
    # non-monotone: the first crossing counts
    assert equivalent_factor([1, 10, 100], [0.9, 0.7, 0.95], 0.8, 1).status == "already"
    assert equivalent_factor([1, 10, 100], [0.7, 0.9, 0.6], 0.8, 1).factor == pytest.approx(10 ** 0.5)
    with pytest.raises(ValueError, match="increasing"):
        equivalent_factor([300, 100], [0.5, 0.6], 0.8, 100)


def _synthetic():
    """Budget 100/300/900 steps at d_model 64; size d_model 32/64/128 at 100 steps; 3 seeds.
    DPA token 0.5/0.7/0.9 along the budget, EA 0.8/0.85/0.9; EA at 100% sequence accuracy at 100 steps,
    DPA reaches it at 900. Size: DPA 0.4/0.5/0.6, EA 0.7/0.8/0.9 (DPA never matches)."""
    recs, jitter = [], (-0.01, 0.0, 0.01)
    budget = {100: (0.5, 0.8), 300: (0.7, 0.85), 900: (0.9, 0.9)}
    size = {32: (0.4, 0.7, 30_000), 128: (0.6, 0.9, 400_000)}
    for s, j in enumerate(jitter):
        for steps, (d, e) in budget.items():
            axes = ["budget", "size"] if steps == 100 else ["budget"]
            point = {} if steps == 100 else {"steps": steps}
            recs.append(synthetic_record("dpa", s, steps, 64, 100_000, d + j, 1.0 if steps == 900 else 0.2, axes, point))
            recs.append(synthetic_record("ea", s, steps, 64, 100_000, e + j, 1.0, axes, point))
        for dm, (d, e, params) in size.items():
            recs.append(synthetic_record("dpa", s, 100, dm, params, d + j, 0.0, ["size"], {"d_model": dm}))
            recs.append(synthetic_record("ea", s, 100, dm, params, e + j, 0.5, ["size"], {"d_model": dm}))
    return recs


def test_analyse_synthetic_records():
    rows = scaling_rows(_synthetic())
    assert len(rows) == 2 * (3 + 3)  # kinds x (budget points + size points), the base on both axes
    res = analyse(rows)[("fam", 0)]["ea"]
    b, s = res["budget"], res["size"]
    assert [p["x"] for p in b["points"]] == [100, 300, 900]
    assert [round(p["gap"].estimate, 6) for p in b["points"]] == [0.3, 0.15, 0.0]
    assert (b["first"], b["last"]) == ("EA", "tie")
    assert b["category"] == category("EA", "tie") and "learns faster" in b["category"]
    assert b["trend_word"] == "shrinks"
    assert b["factor"].status == "reached" and b["factor"].factor == pytest.approx(3 * math.sqrt(3))
    assert b["solved"].startswith("no: DPA reaches 100% at 9x")
    assert [p["d_model"] for p in s["points"]] == [32, 64, 128]
    assert (s["first"], s["last"]) == ("EA", "EA") and s["trend_word"] == "holds"
    assert s["factor"].status == "not reached" and s["factor"].factor == pytest.approx(4.0)


def test_scaling_section_writes_plots_and_lines(tmp_path):
    lines, paths = scaling_section(_synthetic(), tmp_path)
    text = "\n".join(lines)
    assert set(paths) == {"scaling_budget", "scaling_size"}
    for p in paths.values():
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| fam | K=2 | ea | 9x (900 steps) | 0.900 | 0.900 | +0.000 [-0.023, +0.023] |" in text
    assert "not reached (> 4x)" in text and "5.2x" in text
    assert ("| fam | K=2 | ea | +0.30 [+0.28, +0.32] | +0.15 [+0.13, +0.17] | +0.00 [-0.02, +0.02] | "
            "+0.30 [+0.28, +0.32] | +0.30 [+0.28, +0.32] | +0.30 [+0.28, +0.32] | 5.2x | not reached (> 4x) |") in text
    assert scaling_section([r for r in _synthetic() if False], tmp_path) == ([], {})


def test_a_base_run_lies_on_every_axis_whichever_preset_trained_it():
    recs = _synthetic()
    for r in recs:  # as if a budget-only preset had trained the base runs first
        if not r["ladder"]["point"]:
            r["ladder"]["axes"] = ["budget"]
    assert scaling_rows(recs) == scaling_rows(_synthetic())
