import math

import pytest
import torch

import ladder_tiny_tasks  # noqa: F401  (registers "tiny_lag")
from expressive_attention.experiments import RunConfig, evaluate, load_checkpoint, train_run
from expressive_attention.experiments.train import lr_at
from expressive_attention.tasks import eval_generator, make_task

torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared

TINY = dict(task="tiny_lag", task_params={"lag": 2}, d_model=16, n_layers=1, n_heads=2, steps=8, warmup=2,
            batch_size=8, eval_sequences=40)


def test_record_fields_and_values(tmp_path):
    calls = []
    rec = train_run(RunConfig(**TINY, kind="ea"), progress=lambda s, n, loss: calls.append((s, n)),
                    checkpoint=tmp_path / "c.pt")
    m = rec["metrics"]
    assert 0.0 <= m["token_acc"] <= 1.0 and 0.0 <= m["seq_acc"] <= m["token_acc"] + 1e-9
    assert m["sequences"] == 40 and 0 < m["scored_tokens"] < 40 * 7  # at most targets x_2..x_8, less the fresh ones
    assert math.isfinite(m["loss"]) and math.isfinite(m["train_loss"])
    assert rec["steps"] == 8 and rec["tokens"] == 8 * 8 * 8
    assert [c["step"] for c in rec["curve"]][-1] == 8 and len(rec["curve"]) == 8
    assert rec["params"] == sum(p.numel() for p in load_checkpoint(tmp_path / "c.pt")[0].parameters())
    assert rec["label"] == "ea" and rec["config"]["variant"] == "saturating"
    assert set(rec["versions"]) >= {"torch", "expressive_attention"}
    assert rec["wall_s"] > 0 and calls[-1] == (8, 8)
    assert rec["key"] == RunConfig(**TINY, kind="ea").key()


@pytest.mark.parametrize("attention", ["dpa", "ea"])
def test_same_seed_same_numbers_other_seed_differs(attention):
    a = train_run(RunConfig(**TINY, kind=attention, seed=3))
    b = train_run(RunConfig(**TINY, kind=attention, seed=3))
    c = train_run(RunConfig(**TINY, kind=attention, seed=4))
    assert a["metrics"] == b["metrics"] and a["curve"] == b["curve"]
    assert a["curve"] != c["curve"]


def test_checkpoint_reloads_to_same_eval(tmp_path):
    cfg = RunConfig(**TINY, kind="ea", variant="squared")
    rec = train_run(cfg, checkpoint=tmp_path / "m.pt")
    torch.load(tmp_path / "m.pt", weights_only=True)  # plain data only
    model, cfg2 = load_checkpoint(tmp_path / "m.pt")
    assert cfg2 == cfg and model.cfg.variant == "squared"
    task = make_task("tiny_lag", lag=2)
    again = evaluate(model, task, 40, eval_generator(cfg.eval_seed))
    assert again["token_acc"] == pytest.approx(rec["metrics"]["token_acc"])
    assert again["loss"] == pytest.approx(rec["metrics"]["loss"], rel=1e-5)


def test_token_budget_and_config_checks():
    rec = train_run(RunConfig(**{**TINY, "steps": None}, tokens=8 * 8 * 3 + 1))
    assert rec["steps"] == 4  # ceil(193 / 64)
    with pytest.raises(ValueError, match="steps or tokens"):
        RunConfig(**TINY, tokens=100)
    with pytest.raises(ValueError, match="kind"):
        RunConfig(**TINY, kind="softmax")
    with pytest.raises(ValueError, match="batch_size"):
        RunConfig(**{**TINY, "batch_size": 0})
    d = RunConfig(**TINY, kind="dpa", variant="squared")
    assert d.variant is None and d.kind == "dpa"  # dpa has no variant: one key per dpa config
    assert d.key() == RunConfig(**TINY, kind="dpa").key()
    with pytest.raises(ValueError, match="unknown RunConfig fields"):
        RunConfig.from_dict({**d.to_dict(), "bogus": 1})


def test_lr_schedule_warmup_then_cosine_to_zero():
    cfg = RunConfig(**{**TINY, "warmup": 4, "lr": 1.0})
    assert [lr_at(s, cfg, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg, 12) == pytest.approx(1.0)
    assert lr_at(8, cfg, 12) == pytest.approx(0.5)
    assert lr_at(12, cfg, 12) == pytest.approx(0.0, abs=1e-12)


def test_sequence_accuracy_counts_whole_sequences():
    class Oracle(torch.nn.Module):  # predicts the target everywhere except position 3 of row 0
        def __init__(self, y):
            super().__init__()
            self.y = y

        def forward(self, x):
            logits = torch.nn.functional.one_hot(self.y, 4).float()
            logits[0, 3] = logits[0, 3].roll(1)
            return logits

    task = make_task("tiny_lag", lag=2)
    x, y, m = task.sample(5, eval_generator(0))

    class Fixed:
        vocab_size, seq_len = 4, 8

        def sample(self, b, g):
            return x, y, m

    r = evaluate(Oracle(y), Fixed(), 5, eval_generator(0), batch=5)
    assert r["seq_acc"] == pytest.approx(4 / 5)
    assert r["token_acc"] == pytest.approx(1 - 1 / int(m.sum()))


# Two records as the version before the attention= -> kind= rename wrote them (config and key).
OLD_RECORDS = [
    {"key": "4b4420f69afa64b3", "kind": "ea-squared", "config": {
        "task": "pointer", "task_params": {"T": 8, "V": 16}, "attention": "ea", "variant": "squared", "d_model": 64,
        "n_layers": 2, "n_heads": 4, "pos": "learned", "steps": 450, "tokens": None, "batch_size": 32, "lr": 0.001,
        "weight_decay": 0.01, "betas": [0.9, 0.95], "warmup": 100, "grad_clip": 1.0, "seed": 1,
        "eval_sequences": 1024, "eval_seed": 0}},
    {"key": "ed7cc4e9cde407cb", "kind": "dpa", "config": {
        "task": "recall", "task_params": {"K": 2}, "attention": "dpa", "variant": None, "d_model": 64, "n_layers": 2,
        "n_heads": 4, "pos": "learned", "steps": 450, "tokens": None, "batch_size": 32, "lr": 0.001,
        "weight_decay": 0.01, "betas": [0.9, 0.95], "warmup": 100, "grad_clip": 1.0, "seed": 0,
        "eval_sequences": 1024, "eval_seed": 0}},
]


@pytest.mark.parametrize("old", OLD_RECORDS, ids=lambda r: r["kind"])
def test_results_written_before_the_rename_stay_readable_and_resumable(old):
    cfg = RunConfig.from_dict(old["config"])  # old field name, read silently
    assert cfg.kind == old["config"]["attention"] and cfg.label == old["kind"]
    assert cfg.key() == old["key"]  # a resumed sweep skips the run
    new = RunConfig(task=cfg.task, task_params=cfg.task_params, kind=cfg.kind, variant=cfg.variant, steps=450,
                    seed=cfg.seed)
    assert new.key() == old["key"] and "kind" in new.to_dict() and "attention" not in new.to_dict()


def test_a_committed_old_ladder_record_keeps_its_key():
    """docs/ladder-verify was written when RunConfig's `kind` was `attention`, the mechanism's label
    was stored as "kind" and the rung's as ladder["label"]: the results store reads it under today's
    names (results.RUN_KEY_NAMES, RECORD_NAMES, LADDER_NAMES) and the config hashes to the key it was
    stored under (a resumed sweep skips it)."""
    import json
    from pathlib import Path

    from expressive_attention.experiments.results import ResultsStore

    path = Path(__file__).parents[2] / "docs" / "ladder-verify" / "results.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:20]
    assert all("attention" in r["config"] and "kind" in r and "label" in r["ladder"] for r in raw)
    for old, r in zip(raw, ResultsStore(path).read()):
        assert r["key"] == old["key"] and r["label"] == old["kind"] and r["ladder"]["rung_label"] == old["ladder"]["label"]
        assert "kind" not in r and "label" not in r["ladder"]
        cfg = RunConfig.from_dict(r["config"])
        assert cfg.key() == r["key"] and cfg.label == r["label"]
