"""The search space of a sweep, checked before anything is submitted (torch- and ray-free).

    plan = plan_space(cfg)       # cfg.sweep: family, growth_rates, depths, space, search
    plan.dropped                 # ["depth 101 is impossible ...: (depth - 4) must be ...; dropped"]
    plan.params                  # {"model.growth_rate": Param("grid", [12, 24]), ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, ConfigError, apply_overrides, parse_override, validate
from ..models import spec as model_spec

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


@dataclass
class Param:
    kind: str
    values: list[Any]

    @property
    def listed(self) -> bool:
        return self.kind in ("choice", "grid")


@dataclass
class SpacePlan:
    params: dict[str, Param] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def grid_size(self) -> int:
        return math.prod(len(p.values) for p in self.params.values() if p.listed)


def _parse(text: str) -> tuple[str, Param]:
    path, raw = parse_override(text)
    key = ".".join(path)
    raw = str(raw)
    kind, _, args = raw.partition(":")
    if kind not in KINDS or not args:
        raise ConfigError(f"--space {text!r}: write KEY=KIND:ARGS with KIND one of {', '.join(KINDS)} "
                          "(e.g. optim.lr=loguniform:0.01:0.3, model.compression=choice:0.5,1.0)")
    if kind in ("choice", "grid"):
        values = [parse_override(f"x.y={v}")[1] for v in args.split(",") if v.strip()]
        if not values:
            raise ConfigError(f"--space {text!r} lists no values")
        return key, Param(kind, values)
    bounds = args.split(":")
    try:
        lo, hi = (float(b) for b in bounds)
    except ValueError:
        raise ConfigError(f"--space {text!r}: {kind} takes two numbers, LOW:HIGH") from None
    if not lo < hi:
        raise ConfigError(f"--space {text!r}: empty range, LOW must be below HIGH")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"--space {text!r}: loguniform needs LOW > 0")
    if kind == "randint":
        if lo != int(lo) or hi != int(hi):
            raise ConfigError(f"--space {text!r}: randint takes integers")
        return key, Param(kind, [int(lo), int(hi)])
    return key, Param(kind, [lo, hi])


def plan_space(cfg: Config) -> SpacePlan:
    """Growth rates, depths (minus those the family's rule forbids) and --space entries.

    Every value is tried against the config's own validation, so a key that does not exist
    or a value the run would refuse fails here, before any trial starts.
    """
    s = cfg.sweep
    plan = SpacePlan()
    preset = model_spec.family_preset(s.family)
    if s.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {s.samples}")
    if s.search == "grid" and s.samples > 1:
        # Tune would run the grid again with the same seed: the same runs again.
        raise ConfigError(f"--samples {s.samples} with grid search would train each point again with the "
                          "same seed: repeat it with other seeds (--space train.seed=grid:0,1,2), or use "
                          "--search random")
    if s.grace_period < 1 or s.reduction_factor <= 1 or s.max_concurrent < 0:
        raise ConfigError("--grace-period must be >= 1, --reduction-factor > 1 and --max-concurrent >= 0 "
                          f"(0: what the cluster holds), got {s.grace_period}, {s.reduction_factor}, "
                          f"{s.max_concurrent}")
    depths, reasons = [], []
    for d in s.depths:
        try:
            model_spec.resolve(preset, depth=d, bottleneck=s.family == "densenet_bc")
            depths.append(d)
        except model_spec.SpecError as e:
            reasons.append(str(e))
            plan.dropped.append(f"{e}; dropped")
    if s.depths and not depths:
        raise ConfigError(f"no depth in {s.depths} fits the {s.family} family: " + "; ".join(reasons))
    if any(k < 1 for k in s.growth_rates):
        raise ConfigError(f"growth rates must be positive integers, got {s.growth_rates}")
    kind = "grid" if s.search == "grid" else "choice"
    if s.growth_rates:
        plan.params["model.growth_rate"] = Param(kind, list(dict.fromkeys(s.growth_rates)))
    if depths:
        plan.params["model.depth"] = Param(kind, list(dict.fromkeys(depths)))
    for text in s.space:
        key, param = _parse(text)
        if key in plan.params:
            raise ConfigError(f"--space {key} is given twice")
        if key.startswith(("sweep.", "cluster.")):
            raise ConfigError(f"--space {key}: sweep and cluster settings cannot be swept")
        if s.search == "grid" and not param.listed:
            raise ConfigError(f"--space {text!r}: a range needs --search random or optuna "
                              "(grid search takes listed values: choice: or grid:)")
        plan.params[key] = param
    if not plan.params and s.resume:
        # Tune restores the trials' values; the settings they train with come from the flags.
        raise ConfigError(f"--resume {s.name}: give the sweep's flags again as first given "
                          "(--growth-rate, --depth, --space, --epochs, ...): the trials go on with them")
    if not plan.params:
        raise ConfigError("the search space is empty: give --growth-rate, --depth or --space")
    for key, param in plan.params.items():
        probes = param.values if param.listed else param.values[:1]
        for value in probes:
            try:
                validate(apply_overrides(cfg, {key: value, "model.name": preset,
                                               "model.bottleneck": s.family == "densenet_bc"}))
            except ConfigError as e:
                raise ConfigError(f"sweep value {key}={value!r} is impossible: {e}") from None
    return plan


def sample_overrides(plan: SpacePlan) -> dict[str, Any]:
    """The Ray Tune param_space for the plan (imports ray.tune)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, p in plan.params.items():
        if p.kind == "grid":
            out[key] = tune.grid_search(p.values)
        elif p.kind == "choice":
            out[key] = tune.choice(p.values)
        elif p.kind == "uniform":
            out[key] = tune.uniform(*p.values)
        elif p.kind == "loguniform":
            out[key] = tune.loguniform(*p.values)
        else:
            out[key] = tune.randint(p.values[0], p.values[1] + 1)
    return out
