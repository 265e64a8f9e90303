"""Generation speed: tokens/s of ``distseq generate``'s loop with the decoder's cache of keys and values and
without it (every token recomputes the whole context), measured in one run on the same model and prompt.

The model is the token presets' decoder (rotary positions, 2 heads) at the size asked, with random weights
(speed does not depend on what it learned), or a checkpoint's. The prompt and the tokens written fit the
context (``prompt_len + new_tokens <= seq_len``), the regime the cache is for: past the context both paths
recompute it every token. Greedy, so both write the same tokens (``same_tokens`` says they did). The two
take turns, ``rounds`` times, each keeping its best round, so a busy moment of a shared machine does not land
on one side alone. Registered in no suite: a suite calls ``generation_speed``.
"""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from distseq.bench.mixers import _sync

QUICK = {"width": 16, "layers": 1, "seq_len": 32, "prompt_len": 4, "new_tokens": 16, "rounds": 1}


def decoder(width: int, layers: int, seq_len: int, vocab: int, device: torch.device) -> torch.nn.Module:
    """The token presets' decoder (rotary, 2 heads) at this size, seeded weights, eval mode."""
    from distseq.config import from_sources
    from distseq.models import build_model
    from distseq.registry import TASKS

    overrides = {"model.hidden_size": width, "model.num_layers": layers, "data.seq_len": seq_len,
                 "data.vocab_size": vocab}
    cfg = from_sources("induction", overrides=overrides).validate()
    torch.manual_seed(0)
    return build_model(cfg.model, TASKS[cfg.data.task], cfg.task_spec()).to(device).eval()


def generation_speed(width: int = 64, layers: int = 2, seq_len: int = 256, vocab: int = 256, prompt_len: int = 32,
                     new_tokens: int = 224, rounds: int = 3, checkpoint: Optional[str] = None,
                     device: Optional[torch.device] = None) -> Dict:
    """Tokens written per second with the cache and without (best of ``rounds`` each), their ratio
    (``cache_speedup``), and the sizes. ``checkpoint``: measure its model instead (``seq_len`` and ``vocab``
    are then its run's)."""
    from distseq.inference.generate import Sampling, generate

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if checkpoint is not None:
        from distseq.inference.export import model_from_checkpoint

        model, cfg, _ = model_from_checkpoint(checkpoint)
        model = model.to(device)
        seq_len, vocab = cfg.data.seq_len, cfg.data.vocab_size
        width, layers = cfg.model.hidden_size, cfg.model.num_layers
    else:
        model = decoder(width, layers, seq_len, vocab, device)
    if prompt_len < 1 or prompt_len + new_tokens > seq_len:
        raise ValueError(f"prompt_len {prompt_len} + new_tokens {new_tokens} must fit seq_len {seq_len}")
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = Sampling(temperature=0.0)
    best = {True: float("inf"), False: float("inf")}
    written = {}
    generate(model, prompt, 2, greedy, seq_len, cache=True)  # warm-up: first calls allocate
    for _ in range(rounds):
        for cache in (True, False):
            _sync(device)
            started = time.perf_counter()
            written[cache] = generate(model, prompt, new_tokens, greedy, seq_len, cache=cache).tokens
            _sync(device)
            best[cache] = min(best[cache], time.perf_counter() - started)
    cached, uncached = new_tokens / best[True], new_tokens / best[False]
    return {"cached_tokens_per_s": cached, "uncached_tokens_per_s": uncached, "cache_speedup": cached / uncached,
            "same_tokens": written[True] == written[False], "new_tokens": new_tokens, "prompt_len": prompt_len,
            "seq_len": seq_len, "width": width, "layers": layers, "vocab": vocab, "rounds": rounds,
            "device": str(device), "threads": torch.get_num_threads()}
