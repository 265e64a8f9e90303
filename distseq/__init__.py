"""distseq: train sequence models on an exactly sharded synthetic stream, from one CPU to a cluster.

    from distseq import TrainConfig, train
    cfg = TrainConfig()                      # or distseq.preset("seed")
    cfg.model.kind, cfg.train.max_steps = "gru", 300
    summary = train(cfg)                     # in-process; returns summary.json's content
"""

from .config import TrainConfig, preset


def train(cfg: TrainConfig) -> dict:
    """Train in this process (any launcher's rank, a notebook, a test); returns the run summary."""
    from .train import train as _train

    return _train(cfg)


def load_model(directory):
    """Rebuild an exported model for inference: no trainer, no accelerate (see ``distseq export``)."""
    from .export import load_model as _load

    return _load(directory)


__all__ = ["TrainConfig", "preset", "train", "load_model"]
