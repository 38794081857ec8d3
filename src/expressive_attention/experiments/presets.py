"""Ladder presets: which families, which rungs, what model and budget, how many seeds.

A preset is plain data, so users can write their own as JSON (`ea ladder --preset my.json`):

    {"name": "mine", "seeds": 3, "kinds": ["dpa", "ea"], "variants": ["saturating"],
     "base": {"d_model": 64, "n_layers": 2, "steps": 800, "batch_size": 32},
     "families": {"pointer": {"task": "pointer", "rungs": [{"T": 2}, {"T": 4}, {"T": 8}],
                              "base": {"steps": 1200}}}}

`base` holds RunConfig fields shared by every run; a family's own `base` overrides them.

`axes` (optional) varies the run around that base, for every family, rung, kind and seed:

    "axes": {"budget": [{"steps": 450}, {"steps": 1350}, {"steps": 4050}],
             "size": [{"d_model": 32}, {"d_model": 64}, {"d_model": 128}]}

Each entry is a set of RunConfig overrides (one point of the axis). Points of different axes that
give the same config (here d_model 64 at 450 steps, the base) are one run, on both axes. Without
axes a preset has one point per rung: the base.

`levers` (optional; issue #21) multiplies the mechanisms instead: each entry is a list of RunConfig
overrides, and every combination of one entry per lever is its own run, for every kind (the EA-only
options n_ea_heads / layer_kinds are dropped for dpa, whose runs then merge):

    "levers": {"gate": [{}, {"forget_gate": true}], "ea_heads": [{}, {"n_ea_heads": 2}]}

`ea ladder --scales/--gate/--ea-heads/--layer-kinds` fill it from the command line.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import import_task_modules
from ..tasks.ladders import DENSE_RECALL, ladder_rungs
from .kinds import kind_specs, parse_variant
from .train import RunConfig


@dataclass
class Family:
    task: str  # task name for make_task
    rungs: list[dict]  # task params, easiest first
    base: dict = field(default_factory=dict)  # RunConfig overrides for this family
    labels: list[str] | None = None  # x-axis labels (default: the params that change, e.g. "T=8")

    def __post_init__(self):
        if self.labels is not None and len(self.labels) != len(self.rungs):
            raise ValueError(f"labels ({len(self.labels)}) must match rungs ({len(self.rungs)})")


@dataclass
class Preset:
    name: str
    families: dict[str, Family]
    base: dict = field(default_factory=dict)  # RunConfig fields shared by all runs
    seeds: int = 2
    kinds: tuple[str, ...] = ("dpa", "ea")
    variants: tuple[str, ...] = ("saturating",)  # EA variants (each variant is its own run)
    description: str = ""
    axes: dict[str, list[dict]] = field(default_factory=dict)  # axis name -> points (RunConfig overrides)
    levers: dict[str, list[dict]] = field(default_factory=dict)  # lever -> options, crossed with every kind

    def __post_init__(self):
        self.families = {k: v if isinstance(v, Family) else Family(**v) for k, v in self.families.items()}
        self.kinds, self.variants = tuple(self.kinds), tuple(self.variants)
        if self.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {self.seeds}")
        for name, fam in self.families.items():
            if not fam.rungs:
                raise ValueError(f"family {name!r} has no rungs")
        self.axes = {str(a): [dict(pt) for pt in pts] for a, pts in dict(self.axes).items()}
        for a, pts in self.axes.items():
            if not pts or not all(pts):
                raise ValueError(f"axis {a!r} needs at least one point, each a non-empty dict of RunConfig "
                                 f"overrides, got {pts!r}")
        self.levers = {str(a): [dict(o) for o in opts] for a, opts in dict(self.levers).items()}
        for a, opts in self.levers.items():
            if not opts:
                raise ValueError(f"lever {a!r} needs at least one option (a dict of RunConfig overrides, {{}} = off)")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "seeds": self.seeds,
                "kinds": list(self.kinds), "variants": list(self.variants), "base": dict(self.base),
                "axes": {a: [dict(pt) for pt in pts] for a, pts in self.axes.items()},
                **({"levers": {a: [dict(o) for o in opts] for a, opts in self.levers.items()}} if self.levers else {}),
                "families": {k: {"task": f.task, "rungs": f.rungs, "base": f.base, "labels": f.labels}
                             for k, f in self.families.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        d = dict(d)
        return cls(**d)

    def replace(self, *, families=None, kinds=None, variants=None, seeds=None, base=None, levers=None,
                axes=None) -> "Preset":
        """A copy with a subset of families / other kinds, variants, seeds, or extra base fields;
        ``levers`` (lever -> options) replaces those levers; ``axes`` (names) keeps only those axes
        (an empty list: none, i.e. the base point only)."""
        p = copy.deepcopy(self)
        if levers:
            p.levers = {**p.levers, **{str(a): [dict(o) for o in opts] for a, opts in levers.items()}}
        if axes is not None:
            unknown = [a for a in axes if a not in p.axes]
            if unknown:
                raise ValueError(f"unknown axes {unknown}; preset {p.name!r} has {sorted(p.axes) or 'none'}")
            p.axes = {a: p.axes[a] for a in axes}
        if families is not None:
            unknown = [f for f in families if f not in p.families]
            if unknown:
                raise ValueError(f"unknown task families {unknown}; preset {p.name!r} has {sorted(p.families)}")
            p.families = {f: p.families[f] for f in families}
        if kinds is not None:
            p.kinds = tuple(kinds)
        if variants is not None:
            p.variants = tuple(variants)
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"seeds must be >= 1, got {seeds}")
            p.seeds = seeds
        if base:
            fixed = {k for pts in p.axes.values() for pt in pts for k in pt} & {k for k, v in base.items()
                                                                             if v is not None}
            if fixed:  # an axis sets these per point: a preset-wide override would be ignored there
                raise ValueError(f"preset {p.name!r} varies {sorted(fixed)} along its axes; override them by "
                                 f"editing the axes (a JSON preset), not for every run")
            p.base = {**p.base, **base}
            for fam in p.families.values():  # explicit overrides beat family defaults too
                fam.base = {k: v for k, v in fam.base.items() if k not in base}
        return p

    def kind_specs(self) -> list[tuple[str, str | None]]:
        """(kind, variant) pairs: dpa, then one EA run per variant (plain variant names; see mechanisms())."""
        return kind_specs(self.kinds, self.variants)

    def mechanisms(self) -> list[tuple[str, str | None, dict]]:
        """(kind, variant, RunConfig overrides) of every mechanism: each (kind, variant) crossed with
        every combination of the levers' options (EA-only options dropped for dpa; duplicates merged).
        Without levers: kind_specs() with no overrides. A variant "power<p>" (e.g. "power6") is
        variant "power" with degree p."""
        combos = [{}]
        for opts in self.levers.values():
            combos = [{**c, **o} for c in combos for o in opts]
        specs = [parse_variant(v) for v in self.variants]  # "power6": variant "power", degree 6
        powers = iter(p for v, p in specs)
        out: list[tuple[str, str | None, dict]] = []
        for kind, variant in kind_specs(self.kinds, [v for v, _ in specs]):
            power = None if kind == "dpa" else next(powers)
            for c in combos:
                c = {k: v for k, v in c.items() if kind == "ea" or k not in EA_ONLY_FIELDS}
                if power is not None and variant == "power" and "power" not in c:
                    c = {"power": power, **c}
                if (kind, variant, c) not in out:
                    out.append((kind, variant, c))
        return out

    def axis_points(self, fam: Family) -> list[tuple[dict, tuple[str, ...]]]:
        """(RunConfig fields, the axes the point lies on) for one family: the base when there are no
        axes, else each distinct point of the axes, in axis order (shared points merged)."""
        fields = {**self.base, **fam.base}
        if not self.axes:
            return [(fields, ())]
        points: list[tuple[dict, list[str]]] = []
        for axis, pts in self.axes.items():
            for pt in pts:
                merged = {**fields, **pt}
                if "steps" in pt:
                    merged.pop("tokens", None)
                if "tokens" in pt:
                    merged.pop("steps", None)
                same = next((p for p in points if p[0] == merged), None)
                if same is None:
                    points.append((merged, [axis]))
                elif axis not in same[1]:
                    same[1].append(axis)
        return [(f, tuple(a)) for f, a in points]

    def grid(self) -> list["GridPoint"]:
        """Every run, seed-major (an interrupted sweep has whole ladders for the first seeds)."""
        points = []
        for seed in range(self.seeds):
            for fam_name, fam in self.families.items():
                labels = fam.labels or rung_labels(fam.rungs)
                for r, params in enumerate(fam.rungs):
                    for fields, axes in self.axis_points(fam):
                        for kind, variant, lever in self.mechanisms():
                            cfg = RunConfig(task=fam.task, task_params=dict(params), kind=kind,
                                            variant=variant, seed=seed, **{**fields, **lever})
                            points.append(GridPoint(fam_name, r, labels[r], cfg, axes,
                                                    _differences(fields, {**self.base, **fam.base})))
        return points


@dataclass
class GridPoint:
    family: str
    rung: int
    rung_label: str  # "T=16": the rung's label in tables and plots (config.label: the mechanism's)
    config: RunConfig
    axes: tuple[str, ...] = ()  # the preset axes this run lies on (empty: no axes)
    point: dict = field(default_factory=dict)  # its RunConfig fields that differ from the preset's base

    @property
    def is_base(self) -> bool:
        """The run has the preset's base settings (the ladder table and verdicts use these)."""
        return not self.point

    @property
    def point_label(self) -> str:
        """'steps=1350' / 'd_model=32' for off-base points of an axis; '' for the base."""
        return ",".join(f"{k}={_short(v)}" for k, v in self.point.items())


def _differences(fields: dict, base: dict) -> dict:
    return {k: fields.get(k) for k in list(base) + [k for k in fields if k not in base]
            if fields.get(k) != base.get(k)}


def rung_labels(rungs: list[dict]) -> list[str]:
    """'T=8'-style labels from the params that change along the ladder."""
    keys = [k for k in rungs[0] if any(r.get(k) != rungs[0].get(k) for r in rungs)]
    keys += [k for r in rungs for k in r if k not in rungs[0] and k not in keys]
    if not keys:
        return [f"rung {i}" for i in range(len(rungs))]
    return [",".join(f"{k}={_short(r.get(k))}" for k in keys) for r in rungs]


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_short(x)}" for k, x in v.items()) + "}"
    return str(v)


EA_ONLY_FIELDS = ("n_ea_heads", "layer_kinds")  # levers that mix EA into a model: not for dpa runs

# Model and optimiser shared by both presets (calibration: docs/ladder.md).
_OPT = {"batch_size": 32, "lr": 1e-3, "weight_decay": 0.01, "betas": (0.9, 0.95), "grad_clip": 1.0}


def _families(size: str) -> dict[str, Family]:
    """The preset's families from the task package's ladders (tasks/ladders.py, the one source of rungs)."""
    rungs = ladder_rungs(size)
    fams = {name: Family(name, r) for name, r in rungs.items() if name != "multitask"}  # every ladder of tasks/
    p, r, d = rungs["pointer"], rungs["recall"], rungs["lagged_digits"]
    fams["multitask"] = Family("multitask", rungs["multitask"],
                               labels=[f"T{a['T']} K{b['K']} N{c['N']}" for a, b, c in zip(p, r, d)])
    return fams


def _pick(families: dict[str, Family], rungs: dict[str, list[int]]) -> dict[str, Family]:
    """The given rungs (indices) of some families, keeping their labels from the full ladder."""
    out = {}
    for name, idx in rungs.items():
        fam = families[name]
        labels = fam.labels or rung_labels(fam.rungs)
        out[name] = Family(fam.task, [fam.rungs[i] for i in idx], dict(fam.base), [labels[i] for i in idx])
    return out


_QUICK_BASE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "pos": "learned", **_OPT, "steps": 450, "warmup": 45,
               "eval_sequences": 512}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="CPU-sized: 2-layer d_model-64 models (about 0.1 M parameters), 450 AdamW steps of 32 "
                    "sequences of length 64 per run, 4 families x 5 rungs x {DPA, EA} x 2 seeds = 80 runs; no GPU "
                    "needed (`ea ladder --preset quick --dry-run` prints the runs and the estimated time).",
        base=dict(_QUICK_BASE),
        seeds=2,
        families=_families("quick"),
    ),
    "verify": Preset(
        name="verify",
        description="Does EA learn faster, or can it do more? The quick preset's model at one rung per family "
                    "(pointer T=16, lagged_digits N=5, recall K=2), along a budget axis (450, 1350, 4050 steps "
                    "at d_model 64) and a size axis (d_model 32, 64, 128 at 450 steps), DPA vs EA saturating "
                    "and squared, 3 seeds: 3 families x 5 points x 3 kinds x 3 seeds = 135 runs (`ea ladder --preset "
                    "verify --dry-run` prints the runs and the estimated time; docs/ladder.md has the measured ones).",
        base=dict(_QUICK_BASE),
        seeds=3,
        variants=("saturating", "squared"),
        axes={"budget": [{"steps": 450}, {"steps": 1350}, {"steps": 4050}],
              "size": [{"d_model": 32}, {"d_model": 64}, {"d_model": 128}]},
        # recall: the dense layout (every slot a query), where DPA solves the low rungs at this budget
        families=_pick({**_families("quick"), "recall": Family("recall", DENSE_RECALL, labels=[
            f"K={r['K']}" for r in DENSE_RECALL])}, {"pointer": [4], "lagged_digits": [2], "recall": [1]}),
    ),
    "paper": Preset(
        name="paper",
        description="Full size for a bigger machine: 4-layer d_model-128 models, 3000 steps per run, 6 rungs, "
                    "3 seeds, both EA variants (4 families x 6 rungs x 3 kinds x 3 seeds = 216 runs; not calibrated on "
                    "this project's CPU: `--dry-run` extrapolates its time).",
        base={"d_model": 128, "n_layers": 4, "n_heads": 4, "pos": "learned", **_OPT, "steps": 3000, "warmup": 200,
              "eval_sequences": 2048},
        seeds=3,
        variants=("saturating", "squared"),
        families=_families("paper"),
    ),
}


def get_preset(name_or_path: str) -> Preset:
    """A built-in preset by name, or a JSON file holding one."""
    if name_or_path in PRESETS:
        return copy.deepcopy(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.suffix != ".json":
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or a .json file, got {name_or_path!r}")
    if not path.is_file():
        raise ValueError(f"preset file {name_or_path} does not exist")
    try:
        blob = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"preset file {name_or_path} is not valid JSON: {e}") from None
    if not isinstance(blob, dict):
        raise ValueError(f"preset file {name_or_path} must hold a JSON object, got {type(blob).__name__}")
    try:
        return Preset.from_dict(blob)
    except TypeError as e:  # unknown or missing fields
        raise ValueError(f"preset file {name_or_path}: {e}") from None


def check_grid(grid: list[GridPoint]) -> None:
    """Validate every run of a grid before any work: its task (name and parameters) and its model
    (its checks do not depend on the depth: a one-layer copy is built). Raises ValueError naming
    the first bad run."""
    import dataclasses

    from ..tasks import make_task
    from .train import build_model

    tasks: dict[str, object] = {}
    models = set()
    for p in grid:
        c = p.config
        try:
            tkey = json.dumps([c.task, c.task_params], sort_keys=True, default=str)
            if tkey not in tasks:
                tasks[tkey] = make_task(c.task, **c.task_params)
            task = tasks[tkey]
            mkey = (task.vocab_size, task.seq_len, c.d_model, c.n_heads, c.pos, c.kind, c.variant, c.n_ea_heads,
                    c.layer_kinds, c.forget_gate, c.gate_bias_init, c.learn_scale, c.gain_init)
            if mkey not in models:
                models.add(mkey)
                build_model(c if c.layer_kinds is not None else dataclasses.replace(c, n_layers=1), task)
        except Exception as e:
            msg = str(e).strip("'\"") or type(e).__name__
            raise ValueError(f"family {p.family!r}, rung {p.rung_label} ({c.label}): {msg}") from None


def ladder_grid(preset: str, *, imports=(), families=None, kinds=None, variants=None, seeds=None,
                steps=None, levers=None, axes=None, n_layers=None) -> tuple[Preset, list[GridPoint]]:
    """The preset (name or .json file) with the command line's overrides, and its checked grid
    (``levers``: lever -> options, see Preset; ``axes``: the axes to keep)."""
    import_task_modules(imports)  # modules that register the user's own tasks
    base = {"steps": steps, "tokens": None} if steps else {}
    if n_layers:
        base["n_layers"] = n_layers
    p = get_preset(preset).replace(families=families, kinds=kinds, variants=variants, seeds=seeds,
                                   base=base or None, levers=levers, axes=axes)
    grid = p.grid()
    check_grid(grid)
    return p, grid
