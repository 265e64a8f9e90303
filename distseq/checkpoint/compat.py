"""Whether a checkpoint fits this run: the options that identify the data and the model must match;
the others may change, and each change is recorded.

What each option is to a resume is declared once, on its field (``distseq.options``: IDENTITY,
CHANGEABLE, PER_START), for the config's sections and for the chosen task's and model's own options
alike. An option newer than the checkpoint counts as its default, the behaviour before it existed.
A saved config from before options belonged to their owners lists every model's and task's options;
only the chosen component's are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator

from distseq.config.sections import SECTIONS, owner_section
from distseq.config.sources import COMPONENT_FIELDS
from distseq.errors import CheckpointError
from distseq.options import IDENTITY, PER_START, Fact, facts


def _facts_of(section: str, values: dict) -> Iterator[Fact]:
    """The facts of ``section``'s fields, then of its chosen component's own options (as ``values`` choose)."""
    yield from facts(SECTIONS[section])
    registry = owner_section(section)
    if registry is not None and registry.registered(values.get(COMPONENT_FIELDS[section], "")):
        declared = registry.options(values[COMPONENT_FIELDS[section]])
        yield from facts(declared) if declared is not None else ()


def _then(meta: dict, section: str, fact: Fact) -> Any:
    """The value ``fact`` had when the checkpoint was written: its own, else the behaviour before it
    existed (its default; --data-files were streamed before --data-streaming existed)."""
    saved = meta["config"].get(section, {})
    if fact.name in saved:
        return saved[fact.name]
    if (section, fact.name) == ("data", "data_streaming"):
        return meta["config"]["data"].get("data_files") is not None
    return fact.default


def check_compatible(meta: dict, config: dict, path: Path) -> None:
    """Refuse a checkpoint whose data identity or model shape differs from this run's config (``config``:
    ``TrainConfig.to_dict()``), naming the first option that differs."""
    for section in SECTIONS:
        for fact in _facts_of(section, config[section]):
            if fact.resume != IDENTITY:
                continue
            if (section, fact.name) == ("data", "data_files") and "data" in meta and config["data"].get("data_files"):
                continue  # indexed files are identified by their content (meta "data"), wherever they lie now
            then, now = _then(meta, section, fact), config[section].get(fact.name)
            if then != now:
                raise CheckpointError(f"{path} was written with {fact.flag} {then}; this run has {now} "
                                      f"(resume with the same value, or --resume never in a new --run-dir)")


def changed_options(meta: dict, config: dict) -> Dict[str, list]:
    """``{"section.name": [then, now]}`` for every option of this run that differs from the checkpoint's
    (how a start begins, PER_START, is never a change; an option newer than the checkpoint was its default)."""
    changes = {}
    for section in SECTIONS:
        for fact in _facts_of(section, config[section]):
            now, then = config[section].get(fact.name), _then(meta, section, fact)
            if fact.resume != PER_START and then != now:
                changes[f"{section}.{fact.name}"] = [then, now]
    return changes
