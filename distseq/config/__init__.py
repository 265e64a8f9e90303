"""Configuration: the sections (``sections.py``: one dataclass per component, each option's facts on its
field), the single gate every source goes through (``checks.py``), presets (``presets.py``), where a
configuration comes from (``sources.py``: preset, file, command line) and what the launch decides
(``world.py``).

    from distseq.config import TrainConfig, preset
"""

from distseq.config.presets import PRESETS, preset
from distseq.config.run_config import TrainConfig
from distseq.config.sections import (
                                     SECTIONS,
                                     CheckpointConfig,
                                     DataConfig,
                                     LogConfig,
                                     LoopConfig,
                                     ModelConfig,
                                     OptimConfig,
                                     option_for,
)
from distseq.config.sources import apply_mapping, from_sources, read_config_file

__all__ = ["PRESETS", "SECTIONS", "CheckpointConfig", "DataConfig", "LogConfig", "LoopConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "apply_mapping", "from_sources", "option_for", "preset", "read_config_file"]
