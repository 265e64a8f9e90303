"""The run's history that outlives a process: saved in every checkpoint (``meta.json`` ``progress``),
restored on resume, so summary.json after a resume covers the whole run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class Progress:
    first_step: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    skipped_steps: int = 0
    eval_history: List[dict] = field(default_factory=list)
    config_history: List[dict] = field(default_factory=list)
    data_exhausted: bool = False
    tokens: int = 0  # time steps (padding excluded) trained on since first_step, over all ranks
    tokens_estimated_before: Optional[int] = None  # a checkpoint from before tokens were counted: its step
    stopped_at: Optional[dict] = None  # --stop-at held: {"step", "condition", METRIC: value}

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        """The saved history; what an older checkpoint lacks takes its default."""
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, f.name, saved.get(f.name, default))
