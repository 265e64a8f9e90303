"""``TrainConfig``: the whole configuration of a run, one section per component (``sections.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

from distseq.config.checks import profile_range, trackers, validate
from distseq.config.sections import (
    SECTIONS,
    CheckpointConfig,
    DataConfig,
    LogConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    _OwnsOptions,
)
from distseq.options import facts
from distseq.tasks import TaskSpec


@dataclass(slots=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        """``{section: {name: value}}``: every option, the chosen task's and model's own ones included
        (flat in their section, as config files and config.json spell them)."""
        out = {}
        for name in SECTIONS:
            section = getattr(self, name)
            values = {f.name: getattr(section, f.name) for f in facts(type(section))}
            if isinstance(section, _OwnsOptions):
                values.update(section.own_options())
            out[name] = values
        return out

    def flat(self) -> dict:
        """``{"section.field": value}``; the form TensorBoard hparams and summaries use."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def task_spec(self) -> TaskSpec:
        d = self.data
        return TaskSpec(d.seq_len, d.min_seq_len or d.seq_len, d.vocab_size, **d.own_options())

    def micro_batch_size(self, world_size: int) -> int:
        """Samples per forward pass on one process."""
        return self.train.global_batch_size // (world_size * self.train.grad_accum_steps)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every value, whatever its source (command line, config file, Python); raise ConfigError
        naming the option and what is allowed (``checks.py``)."""
        return validate(self, world_size)

    def profile_range(self) -> Optional[Tuple[int, int]]:
        return profile_range(self.log.profile_steps, self.train.max_steps)

    def trackers(self) -> list:
        return trackers(self.log.log_with)
