"""The task contract: what a task is, the shape of its samples, and how it registers.

``make(gen, n, spec)`` draws ``n`` samples at once and returns ``{"x": (n, T, F) float32, "y": ...}``
plus ``"lengths": (n,) int64`` when lengths vary; a token task (``vocab`` set) returns ``x`` as
``(n, T) int64`` token ids in ``[0, vocab(spec))`` instead. The stream (``distseq.data.stream``) seeds
the generator from (seed, split, block), so a task never sees sample indices and never loops over
samples: sample i is a pure function of (seed, block, position in the block). Positions at or beyond a
sample's length are zero in ``x`` and never influence its label. The ``head`` picks the loss, the
metric and the shape of ``y`` (``heads.py``). Tasks are registered by name (``distseq.registry``); the
built-ins register the same way a user's task does, options of their own included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from distseq.options import facts, legacy_default
from distseq.registry import TASKS, source_of
from distseq.tasks.heads import HEADS, per_step_scores

Batch = Dict[str, torch.Tensor]


@dataclass(frozen=True, init=False)
class TaskSpec:
    """What, with the task, defines one sample: its length, the shortest length, the vocabulary, and the
    task's own options (``spec.num_kv_pairs`` for mqar, ``spec.copy_len`` for the copy tasks)."""

    seq_len: int  # T, the padded length of every sample
    min_seq_len: int  # lengths are uniform in [min_seq_len, seq_len]; equal = fixed length
    vocab_size: int = 8  # symbols of the copy task; tokens of the token tasks
    options: Tuple[Tuple[str, Any], ...] = ()  # the task's own options, (name, value) sorted by name

    def __init__(self, seq_len: int, min_seq_len: int, vocab_size: int = 8, *legacy: int, **options: Any):
        # release 0.1 took copy_len and num_kv_pairs positionally, for every task
        options.update(zip(("copy_len", "num_kv_pairs"), legacy))
        given = options.pop("options", ())  # as dataclasses.replace() passes the field back
        object.__setattr__(self, "seq_len", seq_len)
        object.__setattr__(self, "min_seq_len", min_seq_len)
        object.__setattr__(self, "vocab_size", vocab_size)
        object.__setattr__(self, "options", tuple(sorted({**dict(given), **options}.items())))

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the task's options
        if name.startswith("__"):
            raise AttributeError(name)
        for key, value in self.__dict__.get("options", ()):
            if key == name:
                return value
        try:
            return legacy_default("data", name, "a task")
        except AttributeError:
            raise AttributeError(f"TaskSpec has no {name!r} (the task declares no such option)") from None

    @property
    def variable(self) -> bool:
        return self.min_seq_len < self.seq_len

    def as_dict(self) -> Dict[str, Any]:
        """Keyword arguments that rebuild this spec: ``TaskSpec(**spec.as_dict())``."""
        return {"seq_len": self.seq_len, "min_seq_len": self.min_seq_len, "vocab_size": self.vocab_size,
                **dict(self.options)}


def spec_for(task: str, seq_len: int, min_seq_len: Optional[int] = None, vocab_size: int = 8,
             **options: Any) -> TaskSpec:
    """A TaskSpec for the registered ``task``: its own options' defaults, then ``options`` (for code that
    draws a task's samples outside a run: benchmarks, tests)."""
    declared = TASKS.options(task)
    own = {f.name: f.default for f in facts(declared)} if declared is not None else {}
    return TaskSpec(seq_len, min_seq_len or seq_len, vocab_size, **{**own, **options})


@dataclass(frozen=True)
class Task:
    name: str
    head: str  # "binary" | "classes" | "regression" | "per-step": which loss, metric and y shape apply
    label_rule: str  # the documented definition of y, checked by the tests
    make: Callable[[torch.Generator, int, TaskSpec], Batch]
    label: Optional[Callable[[torch.Tensor, Optional[torch.Tensor], TaskSpec], torch.Tensor]]  # y from (x, lengths)
    num_features: Callable[[TaskSpec], int]  # F
    num_outputs: Callable[[TaskSpec], int]  # logits per sample (per step for "per-step"); classes for "classes"
    validate: Optional[Callable[[Any], None]] = None  # checks a TrainConfig; raises ConfigError
    vocab: Optional[Callable[[TaskSpec], int]] = None  # token tasks: x holds ids in [0, vocab(spec)); None: features
    # language modelling: --data-files are documents of tokens cut into windows (data/tokens.py), not rows, and
    # evaluation reports the perplexity, exp(eval/loss)
    language_model: bool = False

    @property
    def tokens(self) -> bool:
        """Whether x holds token ids (n, T) int64 rather than features (n, T, F) float32."""
        return self.vocab is not None

    def input_bytes(self, spec: TaskSpec) -> int:
        """Bytes of one time step of x."""
        return 8 if self.tokens else 4 * self.num_features(spec)

    def example_input(self, n: int, spec: TaskSpec, device=None) -> torch.Tensor:
        """Random inputs of the right kind and shape: (n, T) ids or (n, T, F) features."""
        if self.tokens:
            return torch.randint(0, self.vocab(spec), (n, spec.seq_len), device=device)
        return torch.randn(n, spec.seq_len, self.num_features(spec), device=device)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return HEADS[self.head][0](logits, y)

    def correct(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return HEADS[self.head][1](logits, y)

    def scores(self, logits: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(correct, solved), each (B,): ``correct`` as above; ``solved`` 1.0 where every labelled step
        of a sample is right (per-step heads; one argmax serves both), else the same as ``correct``."""
        if self.head == "per-step":
            return per_step_scores(logits, y)
        correct = self.correct(logits, y)
        return correct, correct


def register_task(name: str, options: Optional[type] = None, replaces: bool = False):
    """Class (or instance) decorator: make a synthetic task available as ``--task NAME``.

    The object declares ``head`` ("binary", "classes", "regression" or "per-step"),
    ``num_features(spec)``, ``num_outputs(spec)`` and ``make(generator, n, spec)``: a vectorised
    function of a seeded ``torch.Generator`` returning ``{"x": (n, T, F) float32, "y": ...}`` (plus
    ``"lengths"`` (n,) int64 when they vary). A token task declares ``vocab(spec)`` instead of
    ``num_features`` and returns ``x`` as (n, T) int64 ids in [0, vocab). Optional: ``label(x,
    lengths, spec)`` (y recomputed from the inputs, which ``distseq check-task`` verifies),
    ``validate(cfg)`` (raise ConfigError) and ``label_rule`` (else the docstring).

    ``options``: a dataclass of the task's own options (``distseq.options.option`` fields); they become
    command-line flags and config keys of the data section, and reach ``make`` as ``spec.NAME``.
    ``replaces``: take over a name registered elsewhere (a built-in's); without it that is an error."""

    def register(obj):
        TASKS.add(name, as_task(name, obj() if isinstance(obj, type) else obj), options, source=source_of(obj),
                  replaces=replaces)
        return obj

    return register


def as_task(name: str, obj) -> Task:
    """A registered task: a Task, or any object with head, num_features, num_outputs and make."""
    if isinstance(obj, Task):
        task = replace(obj, name=name)
    else:
        vocab = getattr(obj, "vocab", None)
        needed = ("head", "num_outputs", "make") + (() if vocab is not None else ("num_features",))
        missing = [a for a in needed if not hasattr(obj, a)]
        if missing:
            raise TypeError(f"task {name!r} lacks {', '.join(missing)} (see distseq.tasks.Task)")
        task = Task(name=name, head=obj.head, label_rule=getattr(obj, "label_rule", "") or (obj.__doc__ or "").strip(),
                    make=obj.make, label=getattr(obj, "label", None),
                    num_features=getattr(obj, "num_features", None) or (lambda spec: 1),
                    num_outputs=obj.num_outputs, validate=getattr(obj, "validate", None), vocab=vocab,
                    language_model=bool(getattr(obj, "language_model", False)))
    if task.head not in HEADS:
        raise TypeError(f"task {name!r} has head {task.head!r}; choose from {', '.join(HEADS)}")
    return task
