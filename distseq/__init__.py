"""distseq: train sequence models on an exactly sharded synthetic stream, from one CPU to a cluster.

    from distseq import TrainConfig, train
    cfg = TrainConfig()                      # or distseq.preset("seed")
    cfg.model.kind, cfg.train.max_steps = "gru", 300
    summary = train(cfg)                     # in-process; returns summary.json's content

Names are imported on first use, so ``import distseq`` (and the command line's start) stays light.
"""

__all__ = ["TrainConfig", "preset", "train", "load_model", "register_task", "register_model", "option"]


def train(cfg, model=None) -> dict:
    """Train in this process (any launcher's rank, a notebook, a test); returns the run summary.
    ``model``: an ``nn.Module`` of your own, ``model(x, lengths) -> logits`` for the task's head.
    Callable any number of times in one interpreter."""
    from distseq.training.loop import train as run

    return run(cfg, model)


def load_model(directory):
    """Rebuild an exported model for inference: no trainer, no accelerate (see ``distseq export``)."""
    from distseq.inference.export import load_model as load

    return load(directory)


def __getattr__(name):
    if name in ("TrainConfig", "preset"):
        from distseq import config

        return getattr(config, name)
    if name == "register_task":
        from distseq.tasks import register_task

        return register_task
    if name == "register_model":
        from distseq.models import register_model

        return register_model
    if name == "option":
        from distseq.options import option

        return option
    raise AttributeError(f"module 'distseq' has no attribute {name!r}")
