"""A sweep file: the base every point shares, the axes of a grid and/or a list of points, and how to run them.

```yaml
base:                       # what every point runs, as `distseq train` takes it
  preset: mqar
  options: {max-steps: 600, eval-every: 50, stop-at: "eval/accuracy>=0.99"}
  import: [my_plugin.py]    # plugins (their options may be axes too)
grid:                       # every combination, in this order
  model: [decoder, lstm]
  hidden-size: [32, 64]
  lr: [0.001, 0.003]
  seed: [0, 1]
points:                     # and/or points of their own
  - {model: gru, hidden-size: 128}
backend: local              # or slurm
processes: 1                # per point (more: distseq launch --multi_gpu --num_processes N)
threads: 1                  # per process (OMP_NUM_THREADS)
pool: auto                  # points at once (local): the cores / (processes x threads)
slurm: {partition: debug, time: "00:30:00"}   # sbatch options of the array job
```

An option is named as the command line spells it (``hidden-size``, ``--hidden-size``) or as config files do
(``hidden_size``); its values are checked as the command line checks them, so a typo or a value of the
wrong type is one line before anything is created. Each point is named after its overrides
(``model=lstm,hidden-size=32,lr=0.001,seed=0``): readable, and stable while the spec only grows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from distseq.config import SECTIONS, from_sources, read_config_file
from distseq.config.sections import component_option_facts, owner_section
from distseq.errors import ConfigError
from distseq.options import Fact, facts
from distseq.registry import import_plugins
from distseq.sweep.layout import Point

TOP_KEYS = ("base", "grid", "points", "backend", "processes", "threads", "pool", "slurm")
BASE_KEYS = ("preset", "config", "options", "import")
BACKENDS = ("local", "slurm")
SWEEP_OWNED = ("run_dir", "resume", "overwrite", "progress")  # each point's: the sweep sets them
MAX_NAME = 150  # characters of a point's directory name; longer ones end in a hash of the whole
SAFE = re.compile(r"[^A-Za-z0-9._+=,-]")


@dataclass(frozen=True)
class Spec:
    path: Path
    preset: str
    config: Optional[str]  # --config FILE of every point
    imports: Tuple[str, ...]
    base: Dict[str, Any]  # {option name: value}
    axes: Dict[str, list]  # the grid, {option name: values}
    points: Tuple[Point, ...]
    backend: str = "local"
    processes: int = 1
    threads: int = 1
    pool: Optional[int] = None  # None: from the cores
    slurm: Dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict:
        """What makes each point's result: a sweep dir refuses a spec that changes it (adding points aside)."""
        return {"processes": self.processes, "threads": self.threads,
                "points": {p.name: list(p.argv) for p in self.points}}

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


def option_facts() -> Dict[str, Tuple[str, Fact]]:
    """``{option name: ("section.name", fact)}`` of every train option a sweep may set, the registered tasks'
    and models' own ones included (import plugins first). The name is the flag's (``model``, ``hidden_size``:
    ``--model`` sets the field ``kind``)."""
    table: Dict[str, Tuple[str, Fact]] = {}
    for section, cls in SECTIONS.items():
        registry = owner_section(section)
        own = component_option_facts(registry).items() if registry is not None else ()
        for fact in [*facts(cls), *(fact for _, (fact, _) in own)]:
            name = fact.flag[2:].replace("-", "_")
            if name not in SWEEP_OWNED:
                table[name] = (f"{section}.{fact.name}", fact)
    return table


def load_spec(path) -> Spec:
    """The sweep file at ``path``, checked whole: a ConfigError names the place and what is wrong."""
    path = Path(path)
    where = str(path)
    raw = read_config_file(str(path))
    if not isinstance(raw, dict):
        raise ConfigError("sweep file", f"{where}: expected a mapping with {', '.join(TOP_KEYS)}")
    _known_keys(raw, TOP_KEYS, where)
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise ConfigError("sweep file", f"{where}: base must be a mapping of {', '.join(BASE_KEYS)}")
    _known_keys(base, BASE_KEYS, f"{where}: base")
    imports = tuple(str(spec) for spec in _as_list(base.get("import"), f"{where}: base.import"))
    import_plugins(imports)  # before the option table: a plugin's own options may be axes
    table = option_facts()
    options = {_canonical(table, name, f"{where}: base.options"): _checked(table, name, value, f"{where}: base.options")
               for name, value in _mapping(base.get("options"), f"{where}: base.options").items()}
    axes = {}
    for name, values in _mapping(raw.get("grid"), f"{where}: grid").items():
        values = _as_list(values, f"{where}: grid.{name}")
        if not values:
            raise ConfigError("sweep file", f"{where}: grid.{name} is empty: give it at least one value")
        axes[_canonical(table, name, f"{where}: grid")] = [_checked(table, name, v, f"{where}: grid.{name}")
                                                           for v in values]
    listed = [{_canonical(table, name, f"{where}: points[{i}]"): _checked(table, name, value, f"{where}: points[{i}]")
               for name, value in _mapping(point, f"{where}: points[{i}]").items()}
              for i, point in enumerate(_as_list(raw.get("points"), f"{where}: points"))]
    if not axes and not listed:
        raise ConfigError("sweep file", f"{where}: no points: give a grid, a list of points, or both")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else []
    preset = str(base.get("preset", "default"))
    config = str(base["config"]) if base.get("config") is not None else None
    points = _points(combos + listed, options, preset, config, imports, table, where)
    backend = raw.get("backend", "local")
    if backend not in BACKENDS:
        raise ConfigError("sweep file", f"{where}: backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    pool = raw.get("pool", "auto")
    return Spec(path=path, preset=preset, config=config, imports=imports, base=options, axes=axes,
                points=points, backend=backend, processes=_count(raw, "processes", where),
                threads=_count(raw, "threads", where), pool=None if pool == "auto" else _count(raw, "pool", where),
                slurm={str(k): str(v) for k, v in _mapping(raw.get("slurm"), f"{where}: slurm").items()})


def _points(overrides: List[dict], base: dict, preset: str, config: Optional[str], imports: Tuple[str, ...],
            table: dict, where: str) -> Tuple[Point, ...]:
    points, seen = [], {}
    for i, over in enumerate(overrides):
        name, same = point_name(over, table), tuple(sorted(over.items()))
        if same in seen:
            raise ConfigError("sweep file", f"{where}: the point {name} is listed twice (points {seen[same]} and "
                                            f"{i}, counting the grid's combinations first)")
        seen[same] = i
        argv = ["--preset", preset, *(["--config", config] if config else []),
                *(a for spec in imports for a in ("--import", spec)),
                *option_argv({**base, **over}, table)]
        points.append(Point(name, over, tuple(argv)))
    return tuple(points)


def point_name(overrides: dict, table: dict) -> str:
    """``model=lstm,hidden-size=32``: the overrides in order, as the command line spells them."""
    if not overrides:
        return "base"
    name = ",".join(f"{table[k][1].flag[2:]}={_text(v)}" for k, v in overrides.items())
    name = SAFE.sub(lambda m: "%{:02X}".format(ord(m.group())), name)
    if len(name) > MAX_NAME:
        name = f"{name[:MAX_NAME - 13]}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name


def option_argv(options: dict, table: dict) -> List[str]:
    """``distseq train`` arguments for ``{option name: value}``."""
    argv: List[str] = []
    for name, value in options.items():
        flag = table[name][1].flag
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is not None:
            argv += [flag, _text(value)]
    return argv


def check_points(spec: Spec) -> Dict[str, str]:
    """``{point name: one-line reason}`` for the points whose whole configuration ``distseq train`` would
    refuse (a combination no single value shows: a --seq-len too short for its --copy-len)."""
    table = option_facts()
    mapping = read_config_file(spec.config) if spec.config else {}
    refused = {}
    for point in spec.points:
        values = {table[name][0]: value for name, value in {**spec.base, **point.overrides}.items()}
        try:
            from_sources(spec.preset, mapping, spec.config or "", values).validate(spec.processes)
        except ConfigError as error:
            refused[point.name] = f"distseq train: error: {error}"
    return refused


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value) if isinstance(value, float) \
        else str(value)


def _canonical(table: dict, name, where: str) -> str:
    key = str(name).lstrip("-").replace("-", "_")
    if key in SWEEP_OWNED:
        raise ConfigError("sweep file", f"{where}: {name!r} is the sweep's to set for each point")
    if key not in table:
        from distseq.config.sources import _did_you_mean

        raise ConfigError("sweep file", f"{where}: unknown option {name!r}"
                                        f"{_did_you_mean(key, sorted(table))}")
    return key


def _checked(table: dict, name, value, where: str):
    key = _canonical(table, name, where)
    fact = table[key][1]
    try:
        return fact.check(value)
    except ConfigError as error:
        raise ConfigError("sweep file", f"{where}: {error}") from None


def _known_keys(mapping: dict, allowed: Tuple[str, ...], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError("sweep file", f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError("sweep file", f"{where} must be a mapping of option: value")
    return value


def _as_list(value, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError("sweep file", f"{where} must be a list (got {value!r})")
    return value


def _count(raw: dict, key: str, where: str) -> int:
    value = raw.get(key, 1)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("sweep file", f"{where}: {key} must be an integer >= 1 (got {value!r})")
    return value
