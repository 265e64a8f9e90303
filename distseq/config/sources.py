"""Where a configuration comes from: a preset, then a config file, then the command line.

``from_sources`` applies them in that order of precedence, each source's choice of task and model
before its options. A preset's task and model options belong to the preset's task and model: choosing
another task or model clears them, so ``--preset mqar --model lstm`` trains an LSTM on the preset's data
without the decoder's ``--positions``. An option given explicitly is never dropped: one the chosen
component does not declare is a one-line error at validation (``config/checks.py``).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from distseq.config.presets import preset
from distseq.config.run_config import TrainConfig
from distseq.config.sections import SECTIONS, owner_section, section_fields
from distseq.errors import ConfigError
from distseq.registry import MODELS, REPLACED, TASKS

MAX_CONFIG_BYTES = 2**20
COMPONENT_FIELDS = {"data": "task", "model": "kind"}  # the field that chooses each section's component


def from_sources(preset_name: str, mapping: Optional[dict] = None, source: str = "",
                 overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """``preset_name``, then ``mapping`` (a config file's sections, read from ``source``), then
    ``overrides`` (``{"section.name": value}``, the command line's)."""
    cfg = preset(preset_name)
    mapping, overrides = dict(mapping or {}), dict(overrides or {})
    for section, chooser in COMPONENT_FIELDS.items():  # the task and model chosen, before anyone's options
        from_file = mapping.get(section, {}).get(chooser) if isinstance(mapping.get(section), dict) else None
        chosen = overrides.pop(f"{section}.{chooser}", from_file)
        if chosen is not None:
            target = getattr(cfg, section)
            if chosen != getattr(target, chooser):
                target.options.clear()  # the preset's own options were its own task's or model's
            setattr(target, chooser, chosen)
            if from_file is not None:
                mapping[section] = {k: v for k, v in mapping[section].items() if k != chooser}
    apply_mapping(cfg, mapping, source)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _did_you_mean(name, choices: Iterable[str]) -> str:
    choices = list(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def read_config_file(path: str) -> dict:
    """A config file's sections as a dict: JSON (.json) or YAML (anything else)."""
    if Path(path).exists() and not Path(path).is_file():
        raise ConfigError("--config", f"{path} is not a regular file")
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("--config", f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError("--config", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"cannot read {path}: not UTF-8 text") from None
    try:
        if path.endswith(".json"):
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError: one line naming the file
        raise ConfigError("--config", f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                                      f"{str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return loaded


def apply_mapping(cfg: TrainConfig, mapping: dict, source: str, saved: bool = False) -> TrainConfig:
    """Set ``{section: {name: value}}`` on ``cfg``: a field, or an option of a registered task (data) or
    model (model); an unknown name is an error naming the nearest valid one. ``saved``: a config a
    checkpoint or export recorded, where an option the chosen component does not declare is dropped
    (before options belonged to their owners, every saved config held every model's and task's)."""
    for section, values in mapping.items():
        if section == REPLACED:
            _check_replaced(values, source)
            continue
        if section not in SECTIONS:
            raise ConfigError("--config", f"{source}: unknown section {section!r}{_did_you_mean(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError("--config", f"{source}: section {section!r} must be a mapping of fields")
        target = getattr(cfg, section)
        fields = [name for name in section_fields(SECTIONS[section]) if name != "options"]
        chooser = COMPONENT_FIELDS.get(section)
        if chooser in values:  # first: which component owns the options that follow
            setattr(target, chooser, values[chooser])
        registry = owner_section(section)
        declared = registry.declared_options() if registry is not None else {}
        for name, value in values.items():
            if name in fields:
                setattr(target, name, value)
            elif name in declared and not (saved and name not in _own(target)):
                setattr(target, name, value)
            elif not (saved and name in declared):
                raise ConfigError("--config", f"{source}: unknown key {section}.{name}"
                                              f"{_did_you_mean(name, [*fields, *declared])}")
    return cfg


def _check_replaced(recorded, source: str) -> None:
    """A config.json written by a run that used a replaced task or model runs again only with a replacement
    of that name in force (from wherever the plugin lies now): the same name would otherwise mean the
    built-in."""
    if not isinstance(recorded, dict) or not all(isinstance(r, dict) for r in recorded.values()):
        raise ConfigError("--config", f"{source}: 'replaced' must map task/model to what replaced it (as "
                                      f"config.json records it)")
    for kind, record in recorded.items():
        registry = TASKS if kind == "task" else MODELS
        if registry.replacement(str(record.get("name", ""))) is None:
            raise ConfigError("--config", f"{source}: it ran {kind} {record.get('name')!r} as replaced by "
                                          f"{record.get('by')}; --import that plugin to run it again")


def _own(section) -> set:
    """The names of the options the section's chosen component declares (none if it is unknown)."""
    try:
        return {f.name for f in section.option_facts()}
    except ConfigError:
        return set()
