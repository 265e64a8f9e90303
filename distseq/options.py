"""Options: every fact about an option stated once, on its dataclass field.

    from dataclasses import dataclass
    from typing import Literal
    from distseq.options import option

    @dataclass
    class DecoderOptions:
        positions: Literal["sinusoidal", "learned", "rope"] = option("sinusoidal", "position encoding")
        num_heads: int = option(4, "attention heads (must divide --hidden-size)", low=1)

The type comes from the annotation: ``int``, ``float``, ``str``, ``bool``, a ``Literal`` of choices, or
``Optional`` of one of these (absent allowed). The rest comes from ``option(...)``: the help text, the
command-line flag (``--num-heads`` unless ``flag`` says otherwise), bounds, a registry whose names are
the choices, and what a resume does with it (``resume``). The command line, the validation of every
source (command line, config file, Python), the resume checks, ``probe`` and ``check-task`` read these
facts through ``facts(cls)``; nothing restates them. The config sections (``distseq.config``) and the
options a task or model declares at registration (``register_model(name, options=...)``) are written
this way alike. Standard library only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import typing
from typing import Any, Literal, Optional, Tuple

from distseq.errors import ConfigError

# what a resume does with an option
IDENTITY = "identity"  # defines the data or the model's shape: a resume needs the same value
CHANGEABLE = "changeable"  # may change on resume: the change is printed and recorded in the run's history
PER_START = "per-start"  # how this start begins (run dir, resume, overwrite, start step): never compared
RESUME = (IDENTITY, CHANGEABLE, PER_START)

# Bounds that keep every value inside what the code can represent or this kind of machine can hold;
# beyond them a value is a typo, and an error beats an overflow deep inside torch.
MAX_POSITION = 2**62  # stream positions are int64
MAX_SEED = 2**63 - 1
MAX_SEQ_LEN = 2**20
MAX_VOCAB = 2**24
MAX_WIDTH = 2**16
MAX_LAYERS = 1024
MAX_WORKERS = 256
MAX_WORLD = 2**20
MAX_TIMEOUT_S = 365 * 24 * 3600

_TYPES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}

# The options every model and every task shared before they belonged to their owners (release 0.1). A plugin
# written then may read them (``cfg.num_heads``, ``spec.copy_len``) without declaring them: it reads these
# defaults, with a DeprecationWarning saying to declare them (a value given for them is refused, naming the
# models or tasks that take it).
LEGACY_OPTIONS = {
    "model": {"num_heads": 4, "positions": "sinusoidal", "bidirectional": False, "tie_embeddings": False},
    "data": {"copy_len": 5, "num_kv_pairs": 8},
}


def legacy_default(section: str, name: str, owner: str):
    """The release-0.1 default of an option ``owner`` reads without declaring it; AttributeError otherwise."""
    import warnings

    if name not in LEGACY_OPTIONS[section]:
        raise AttributeError(name)
    warnings.warn(f"{owner} reads {name!r} without declaring it: declare it among its own options "
                  f"(register_{'model' if section == 'model' else 'task'}(..., options=...)); until then it reads "
                  f"the default {LEGACY_OPTIONS[section][name]!r}", DeprecationWarning, stacklevel=3)
    return LEGACY_OPTIONS[section][name]


def option(default: Any, help: str, *, flag: Optional[str] = None, resume: str = IDENTITY,
           low: Optional[float] = None, high: Optional[float] = None, above: Optional[float] = None,
           below: Optional[float] = None, registry: Optional[str] = None) -> Any:
    """A documented option field. ``flag``: the command-line name when not ``--field-name``; ``resume``:
    IDENTITY (default), CHANGEABLE or PER_START; ``low``/``high``: inclusive bounds, ``above``/``below``:
    exclusive ones (a bounded float must also be finite); ``registry``: "task" or "model", whose
    registered names are the choices (known at run time)."""
    if resume not in RESUME:
        raise ValueError(f"resume must be one of {', '.join(RESUME)} (got {resume!r})")
    metadata = {"help": help, "flag": flag, "resume": resume, "low": low, "high": high, "above": above,
                "below": below, "registry": registry}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class Fact:
    """One option as every reader sees it."""

    name: str  # the field's name, also the key in config files and config.json
    flag: str  # the command-line spelling: --hidden-size
    kind: type  # int, float, str or bool
    optional: bool  # None (absent) is allowed
    choices: Tuple[Any, ...]  # from a Literal; () when any value of the kind goes
    registry: Optional[str]  # "task" or "model": the choices are that registry's names
    help: str
    resume: str  # IDENTITY, CHANGEABLE or PER_START
    default: Any
    low: Optional[float] = None
    high: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None

    def check(self, value: Any) -> Any:
        """``value`` as this option holds it (a Path as str, a numpy integer as int, an int as float, YAML's
        ``1e-3`` string as the float it spells), or a ConfigError naming the flag and what is allowed."""
        if value is None and self.optional:
            return None
        value = _coerce(self.kind, value)
        if not _is(self.kind, value):
            absent = " or absent" if self.optional else ""
            hint = " (YAML reads yes/no/on/off as booleans and 1:3 as a number: quote it)" if (
                self.kind is str and isinstance(value, (bool, int))) else ""
            raise ConfigError(self.flag, f"must be {_TYPES[self.kind]}{absent} (got {value!r}){hint}")
        if self.choices and value not in self.choices:
            raise ConfigError(self.flag, f"invalid choice {value!r} (choose from {', '.join(map(str, self.choices))})")
        self._check_bounds(value)
        return float(value) if self.kind is float else value

    def _check_bounds(self, value) -> None:
        if self.kind is int:
            low = self.low if self.low is not None else -math.inf
            high = self.high if self.high is not None else math.inf
            if not low <= value <= high:
                limits = ([f">= {self.low}"] if self.low is not None else []) + (
                    [f"<= {self.high}"] if self.high is not None and (value > high or self.low is None) else [])
                raise ConfigError(self.flag, f"must be an integer {' and '.join(limits)} (got {value!r})")
            return
        if self.kind is not float:
            return
        limits = [(bound, sign) for bound, sign in ((self.low, ">="), (self.above, ">"), (self.high, "<="),
                                                      (self.below, "<")) if bound is not None]
        ok = math.isfinite(value) and all({">=": value >= b, ">": value > b, "<=": value <= b, "<": value < b}[s]
                                          for b, s in limits)
        if not ok:  # every number an option takes is finite: NaN and infinity are typos or overflows
            raise ConfigError(self.flag, "must be a finite number" + "".join(
                f"{' and' if i else ''} {s} {b:g}" for i, (b, s) in enumerate(limits)) + f" (got {value!r})")


def _coerce(kind: type, value: Any) -> Any:
    if kind is str and isinstance(value, os.PathLike):  # pathlib.Path from Python
        return os.fspath(value)
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        try:
            return float(value)  # an integer is a valid number
        except OverflowError:
            return value  # past any float: refused below, naming the option
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)  # numpy integers from Python
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _is(kind: type, value: Any) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, kind) and not isinstance(value, bool)
    return isinstance(value, str)


def flag_of(name: str) -> str:
    """``hidden_size`` -> ``--hidden-size``."""
    return "--" + name.replace("_", "-")


@functools.lru_cache(maxsize=None)
def facts(cls: type) -> Tuple[Fact, ...]:
    """The facts of every field of the dataclass ``cls``, in order; TypeError for a type no option takes."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"options must be a dataclass (got {cls!r})")
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or not f.init or f.metadata.get("component_options"):
            continue
        kind, optional, choices = _parse(hints[f.name], f"{cls.__name__}.{f.name}")
        meta = f.metadata
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{f.name}: an option needs a default (what applies when nobody sets it)")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Fact(name=f.name, flag=flag_of(meta.get("flag") or f.name), kind=kind, optional=optional,
                        choices=choices, registry=meta.get("registry"), help=meta.get("help", ""),
                        resume=meta.get("resume", IDENTITY), default=default, low=meta.get("low"),
                        high=meta.get("high"), above=meta.get("above"), below=meta.get("below")))
    return tuple(out)


def fact(cls: type, name: str) -> Fact:
    return next(f for f in facts(cls) if f.name == name)


def _parse(hint: Any, where: str) -> Tuple[type, bool, Tuple[Any, ...]]:
    """(kind, optional, choices) of a supported annotation."""
    optional = False
    if typing.get_origin(hint) is typing.Union:
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"{where}: an option is one type or Optional of one (got {hint!r})")
        hint, optional = members[0], True
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        kinds = {type(c) for c in choices}
        if len(kinds) != 1 or not kinds <= set(_TYPES):
            raise TypeError(f"{where}: a Literal option's choices must all be str, int or float (got {hint!r})")
        return kinds.pop(), optional, choices
    if hint not in _TYPES:
        raise TypeError(f"{where}: an option is int, float, str, bool, a Literal of these, or Optional of one "
                        f"(got {hint!r})")
    return hint, optional, ()
