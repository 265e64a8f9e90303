"""Registries: tasks and models by name, and the plugins that add to them.

Built-in tasks and models register exactly as a user's do (``register_task`` lives in
``distseq.tasks``, ``register_model`` in ``distseq.models``), so a new one is one file and no edit
inside distseq. Each may declare options of its own, a dataclass of ``distseq.options.option`` fields:
the command line, config files, validation, ``--help``, config.json and the resume checks take them
like any built-in option:

    import distseq

    @distseq.register_task("my-task")
    class MyTask: ...          # head, num_features, num_outputs, make (see distseq.tasks.Task)

    @dataclass
    class MyModelOptions:
        kernel: int = option(3, "width of the convolution", low=1)

    @distseq.register_model("my-model", options=MyModelOptions)
    class MyModel(torch.nn.Module):
        def __init__(self, cfg, task, spec): ...   # cfg.hidden_size, cfg.kernel; forward(x, lengths) -> logits

A name is registered once: a second registration of a name from elsewhere (a plugin's ``sum-sign``) is
refused in one line naming both, unless it says ``replaces=True``; config.json and summary.json of a run
that uses a replaced name record it. Importing the same plugin again is harmless.

``--import MODULE_OR_FILE`` (repeatable, every subcommand) imports a plugin before anything else,
and modules named by the ``distseq.plugins`` entry-point group are imported as well. Checkpoints and
exports record the plugins a run used, so ``eval``, ``predict``, ``export`` and ``load_model`` import
them again. This module imports nothing heavy from distseq.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from distseq.errors import ConfigError
from distseq.options import facts

ENTRY_POINT_GROUP = "distseq.plugins"


class Registry(Mapping):
    """Named things of one kind (a read-only mapping); an unknown name is a ConfigError listing the
    known ones."""

    def __init__(self, kind: str, option: str):
        self.kind, self.option = kind, option
        self._items: Dict[str, object] = {}
        self._options: Dict[str, Optional[type]] = {}
        self._sources: Dict[str, str] = {}
        self._replaced: Dict[str, tuple] = {}  # name -> (item, options, source) that a replacement took over

    def add(self, name: str, item: object, options: Optional[type] = None, source: Optional[str] = None,
            replaces: bool = False) -> None:
        """Register ``item`` as ``name``; ``options``: the dataclass of its own options (checked here: every
        field's type must be one an option takes); ``source``: where it was defined (default: ``item``'s
        module and name); ``replaces``: take over a name registered from elsewhere (else a ConfigError)."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise ValueError(f"a {self.kind} name must be a non-empty string without spaces around it (got {name!r})")
        if options is not None:
            facts(options)  # a TypeError names the field whose type no option takes
        _load_builtins()  # a plugin imported first must still meet the built-in it would shadow
        source = source or source_of(item)
        earlier = self._sources.get(name)
        if earlier is not None and earlier != source:  # the same definition again (a re-import) is harmless
            if not replaces:
                raise ConfigError("--import", f"{self.kind} {name!r} is registered twice: by {earlier} and by "
                                              f"{source}; give it another name, or register_{self.kind}({name!r}, "
                                              f"replaces=True) to replace the first")
            self._replaced.setdefault(name, (self._items[name], self._options[name], earlier))
        self._items[name], self._options[name], self._sources[name] = item, options, source

    def remove(self, name: str) -> None:
        """Forget ``name`` and its options (a test's or a notebook's own registration), bringing back what
        it replaced; nothing if absent."""
        self._items.pop(name, None)
        self._options.pop(name, None)
        self._sources.pop(name, None)
        if name in self._replaced:
            self._items[name], self._options[name], self._sources[name] = self._replaced.pop(name)

    def replacement(self, name: str) -> Optional[dict]:
        """``{"name", "by", "instead_of"}`` when ``name`` replaced an earlier registration, else None."""
        if name not in self._replaced:
            return None
        return {"name": name, "by": self._sources[name], "instead_of": self._replaced[name][2]}

    def declared_options(self) -> Dict[str, List[str]]:
        """``{option name: [names that declare it]}`` over every registered entry."""
        _load_builtins()
        out: Dict[str, List[str]] = {}
        for name, declared in sorted(self._options.items()):
            for f in facts(declared) if declared is not None else ():
                out.setdefault(f.name, []).append(name)
        return out

    def options(self, name: str) -> Optional[type]:
        """The options dataclass ``name`` declared at registration, None when it declared none."""
        self.get(name)
        return self._options.get(name)

    def names(self) -> List[str]:
        _load_builtins()
        return sorted(self._items)

    def get(self, name: str):
        _load_builtins()
        if name not in self._items:
            raise ConfigError(self.option, f"invalid choice {name!r} (choose from {', '.join(self.names())}; "
                                           f"a plugin adds more: --import MODULE)")
        return self._items[name]

    def __getitem__(self, name: str):
        return self.get(name)

    def __iter__(self):
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def registered(self, name: str) -> bool:
        """Whether ``name`` is registered now, without importing the built-ins first."""
        return name in self._items

    def __contains__(self, name) -> bool:
        _load_builtins()
        return name in self._items


def source_of(obj) -> str:
    """Where ``obj`` (a class, a function, or an instance of a class) was defined: a distseq module by
    name, any other by its file (or its name when it has none, as in a notebook), then its qualified name."""
    target = obj if isinstance(obj, type) or hasattr(obj, "__qualname__") else type(obj)
    module_name = getattr(target, "__module__", None) or "?"
    module = sys.modules.get(module_name)
    where = getattr(module, "__file__", None) if not module_name.startswith("distseq.") else None
    return f"{where or module_name}:{getattr(target, '__qualname__', type(target).__name__)}"


TASKS = Registry("task", "--task")
MODELS = Registry("model", "--model")
REPLACED = "replaced"  # config.json's and summary.json's record of the replaced names a run used


def replacements_in(task: str, model: str) -> Dict[str, dict]:
    """The replaced names a run of ``task`` and ``model`` uses: ``{"task": {...}, "model": {...}}``."""
    found = {"task": TASKS.replacement(task), "model": MODELS.replacement(model)}
    return {kind: record for kind, record in found.items() if record}


def check_replacements(recorded, task: str, model: str, where: str) -> None:
    """The names ``where`` (a checkpoint, an export) ran as replaced are replaced now, and only those (by kind
    and name: the plugin may have moved); else one name would mean another task or model than it trained."""
    now = replacements_in(task, model)
    recorded = recorded if isinstance(recorded, dict) else {}
    for kind, name in (("task", task), ("model", model)):
        then = recorded.get(kind)
        if bool(then) == bool(now.get(kind)):
            continue
        if then:
            by = then.get("by") if isinstance(then, dict) else then
            raise ConfigError("--import", f"{where} ran {kind} {name!r} as replaced by {by}; --import that plugin "
                                          f"(from its new place if it moved)")
        raise ConfigError("--import", f"{where} ran the built-in {kind} {name!r}; this process has it replaced by "
                                      f"{now[kind]['by']}")


PLUGINS: List[str] = []  # what --import / entry points loaded in this process, in order


def import_plugin(spec: str) -> None:
    """Import ``spec``: a module name (``my_pkg.models``) or a Python file's path."""
    if spec.endswith(".py") or Path(spec).is_file():
        spec = str(Path(spec).resolve())  # recorded absolute: a later eval or load_model runs elsewhere
    if spec in PLUGINS:
        return
    try:
        if spec.endswith(".py") or Path(spec).is_file():
            path = Path(spec)
            if not path.is_file():
                raise ConfigError("--import", f"no such file: {spec}")
            name = f"distseq_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except ConfigError:
        raise
    except Exception as error:  # ImportError, or the plugin's own bug: one line naming it
        first = (str(error).splitlines() or [""])[0]
        raise ConfigError("--import", f"cannot import {spec}: {type(error).__name__}: {first}") from None
    PLUGINS.append(spec)


def import_plugins(specs: Iterable[str] = ()) -> None:
    """The entry-point group's modules, then ``specs`` (from --import or a checkpoint's record)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        import_plugin(entry.value.split(":")[0])
    for spec in specs:
        import_plugin(spec)


def import_recorded(specs: Iterable[str], task: str, model: str, replaced: Optional[dict] = None) -> None:
    """The plugins a checkpoint or export recorded, imported again for its ``task`` and ``model`` (and the
    ``replaced`` names it ran). Each is imported; one that cannot be (a file that moved, or that registers
    names an ``--import`` of its new place registered already) is passed over when, in the end, every name
    the run needs is registered: the import of its new place satisfied it. Otherwise the first such
    plugin is one line naming it."""
    import_plugins()  # the entry-point group's
    failed = []
    for spec in specs:
        try:
            import_plugin(spec)
        except ConfigError as error:
            failed.append((spec, error.message))
    wanted = {kind: record.get("name") for kind, record in (replaced or {}).items() if isinstance(record, dict)}
    satisfied = task in TASKS and model in MODELS and all(
        (TASKS if kind == "task" else MODELS).replacement(str(name)) for kind, name in wanted.items())
    if failed and not satisfied:
        spec, why = failed[0]
        raise ConfigError("--import", f"this run's plugin {spec} cannot be imported ({why}); if it moved, pass "
                                      f"--import with its new place")


_builtins_loaded = [False]
# imported by name: they import this module
BUILTIN_MODULES = ("distseq.tasks.synthetic", "distseq.tasks.tokens", "distseq.models.recurrent",
                   "distseq.models.encoder", "distseq.models.decoder",
                   "distseq.models.mixers.sliding_window", "distseq.models.mixers.based",
                   "distseq.models.mixers.hyena", "distseq.models.mixers.mamba")


def _load_builtins() -> None:
    """The built-in tasks and models register on import of their modules; import them on first use."""
    if not _builtins_loaded[0]:
        _builtins_loaded[0] = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)
