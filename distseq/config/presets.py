"""Presets: named starting configurations; every other option overrides them (``sources.py``)."""

from __future__ import annotations

from distseq.config.run_config import TrainConfig
from distseq.config.sections import CheckpointConfig, DataConfig, LogConfig, LoopConfig, ModelConfig, OptimConfig
from distseq.errors import ConfigError


def _seed_preset() -> TrainConfig:
    """The original example, done right: nn.RNN(1, 32), seq 10, batch 32, Adam lr 0.01, 1,000 samples x 10 epochs."""
    return TrainConfig(
        data=DataConfig(task="sum-sign", seq_len=10, dataset_size=1000),
        model=ModelConfig(kind="rnn", hidden_size=32, num_layers=1),
        optim=OptimConfig(lr=0.01, schedule="constant", warmup_steps=0, grad_clip=0.0),
        # 1,000 samples in batches of 32 are 32 batches an epoch (the last one short); 10 epochs = 320 steps.
        # fp32 like the original (on CPU, auto would pick bf16 where it runs; for this small RNN it is slower)
        train=LoopConfig(run_dir="runs/seed", max_steps=320, global_batch_size=32, eval_every=32, precision="no"),
        checkpoint=CheckpointConfig(),
        log=LogConfig(log_every=32),
    )


def _default_preset() -> TrainConfig:
    """What the harness is for: an LSTM on the infinite streamed sum-sign task."""
    return TrainConfig()


def _token_preset(task: str, seq_len: int, vocab_size: int, max_steps: int, batch: int, **task_options) -> TrainConfig:
    """A causal decoder (2 layers, width 64, 2 heads, rotary positions) on a token task, sized for a CPU:
    AdamW 3e-3 without weight decay, 100 warmup steps, fp32 (bf16 is slower on most CPUs)."""
    return TrainConfig(
        data=DataConfig(task=task, seq_len=seq_len, vocab_size=vocab_size, eval_size=1024, options=task_options),
        model=ModelConfig(kind="decoder", hidden_size=64, num_layers=2, options={"num_heads": 2, "positions": "rope"}),
        optim=OptimConfig(lr=3e-3, weight_decay=0.0, warmup_steps=100),
        train=LoopConfig(run_dir=f"runs/{task}", max_steps=max_steps, global_batch_size=batch, eval_every=100,
                         precision="no"),
        log=LogConfig(log_every=50),
    )


PRESETS = {
    "default": _default_preset,
    "seed": _seed_preset,
    # Zoology's MQAR at a CPU's scale (the paper: vocab 8,192, seq 64-512, 4-64 pairs)
    "mqar": lambda: _token_preset("mqar", seq_len=64, vocab_size=128, num_kv_pairs=8, max_steps=2000, batch=256),
    # one answer per sequence: a large batch (the two-layer model reaches 1.0 near step 200, measured)
    "induction": lambda: _token_preset("induction", seq_len=16, vocab_size=16, max_steps=400, batch=1024),
    # Mamba's selective copying: 16 tokens to copy, a vocabulary of 16 (14 data tokens, noise and the
    # marker; the paper: sequences of 4,096)
    "selective-copy": lambda: _token_preset("selective-copy", seq_len=256, vocab_size=16, copy_len=16,
                                            max_steps=2000, batch=64),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError("--preset", f"invalid choice {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]()
