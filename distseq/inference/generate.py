"""``distseq generate``: a causal model of a checkpoint writes tokens after a prompt.

The model's logits at the last position of the context score the next token: greedy (``temperature``
0: the argmax), or a draw from softmax(logits / temperature) over the ``top_k`` largest (all by
default), from one ``torch.Generator`` seeded once, so a seed gives the same tokens every time. The
context is the last ``--seq-len`` tokens of the run (what the model was trained on): past that the
oldest ones fall out. Generation stops after ``max_new_tokens`` or at the run's end-of-document id.

The cache (``MixerStack.forward_cached``: the decoder's and the window's keys and values) makes each new
token cost one position. Its logits equal the whole context's recomputed (``--no-cache``) to rounding,
so both draw the same tokens: once the text passes the context, every position's embedding and keys
change with each token that falls out, and the cache is rebuilt from the context each step (as costly
as no cache). Models without a cached form (the other mixers, rnn, gru, lstm) recompute every step.

Which models generate: a token task's per-step logits over its vocabulary, from a model whose ``causal``
attribute is true (every ``MixerStack``; the recurrent models in one direction; a plugin model that sets
it), so the logits at the last position read nothing that is not there yet.

With a text run (``data.text.run_codec``: bytes or a tokenizer.json) a text prompt is encoded and the
output is the text: the prompt followed by what the model wrote. A run on token ids takes ids and writes
JSON: ``{"prompt": [...], "generated": [...], "ended": "eod" | "max-new-tokens"}``. The end-of-document
id itself is never part of the output.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import nn

from distseq.config import TrainConfig
from distseq.errors import ConfigError, DataFileError, NonFiniteError
from distseq.fsio import write_text_atomically
from distseq.options import MAX_SEED
from distseq.registry import TASKS

MAX_NEW_TOKENS = 10**6
CAUSAL_MODELS = "the decoder, the mixers (sliding-window, based, hyena, mamba), one-directional rnn, gru, lstm"


@dataclass
class Sampling:
    """How the next token is chosen from the logits."""

    temperature: float = 1.0  # 0: greedy (the argmax); else softmax(logits / temperature)
    top_k: Optional[int] = None  # draw among the k largest logits only; None: all
    seed: int = 0  # the one generator's seed: the same seed, the same tokens

    def check(self) -> "Sampling":
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError("--temperature", f"must be a finite number >= 0 (0 = greedy) (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError("--top-k", f"must be an integer >= 1 (got {self.top_k})")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("--seed", f"must be an integer in [0, {MAX_SEED}] (got {self.seed})")
        return self


@dataclass
class Generated:
    prompt: List[int]
    tokens: List[int]  # what the model wrote, the end-of-document id left out
    ended: str  # "eod" or "max-new-tokens"


# --- which models generate ---------------------------------------------------------------------------
def check_generates(model: nn.Module, cfg: TrainConfig) -> None:
    """A ConfigError naming the model or task unless the model scores the next token: a token task's per-step
    logits over its vocabulary, from a causal model (``causal``: the output at t reads tokens 0..t only)."""
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    if not task.tokens or task.head != "per-step" or task.num_outputs(spec) != task.vocab(spec):
        raise ConfigError("--checkpoint", f"its --task {cfg.data.task} has no per-step logits over a token "
                                          f"vocabulary, so its model scores no next token and cannot generate")
    if not getattr(model, "causal", False):
        raise ConfigError("--checkpoint", f"its --model {cfg.model.kind} is not causal (its output at a position "
                                          f"reads later tokens) and cannot generate; causal models: "
                                          f"{CAUSAL_MODELS}")


# --- the next token's logits, with or without the cache ----------------------------------------------
class Uncached:
    """Every step runs the model on the whole context: the last ``context`` tokens."""

    def __init__(self, model: nn.Module, context: int):
        self.model, self.context = model, context
        self.device = next(model.parameters()).device

    def __call__(self, tokens: List[int]) -> torch.Tensor:
        """(C,) float32 logits, on the CPU, of the token after ``tokens``."""
        window = torch.tensor([tokens[-self.context:]], device=self.device)  # (1, T)
        return self.model(window)[0, -1].float().cpu()


class Cached(Uncached):
    """The model's cache holds ``tokens[start:start + cache.length]``; each step feeds what it lacks (one
    token), or rebuilds it from the context when the text has passed the context."""

    def __init__(self, model: nn.Module, context: int):
        super().__init__(model, context)
        self.cache, self.start = None, 0

    def __call__(self, tokens: List[int]) -> torch.Tensor:
        if self.cache is None or len(tokens) - self.start > self.context:
            self.start = max(0, len(tokens) - self.context)
            self.cache = self.model.new_cache()
        new = torch.tensor([tokens[self.start + self.cache.length:]], device=self.device)  # (1, T)
        return self.model.forward_cached(new, self.cache)[0, -1].float().cpu()


def stepper(model: nn.Module, context: int, cache: bool = True) -> Uncached:
    """The cached stepper where the model has a cached form and ``cache`` is asked for, else the uncached one."""
    new_cache = getattr(model, "new_cache", None)
    if cache and callable(new_cache) and new_cache() is not None:
        return Cached(model, context)
    return Uncached(model, context)


# --- choosing tokens ---------------------------------------------------------------------------------
def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The token chosen from ``logits`` (C,): the argmax at temperature 0, else one draw of ``generator``."""
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteError("the model's logits are not finite (NaN or inf): this checkpoint cannot generate")
    if sampling.temperature == 0:
        return int(logits.argmax())
    if sampling.top_k is not None and sampling.top_k < logits.shape[0]:
        logits, ids = logits.topk(sampling.top_k)  # (k,), (k,)
    else:
        ids = None
    # the largest at 0 first: a tiny temperature then sends the others to -inf, never a NaN
    scaled = (logits - logits.max()) / sampling.temperature  # (k,)
    drawn = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
    return int(ids[drawn]) if ids is not None else drawn


@torch.no_grad()
def generate(model: nn.Module, prompt: List[int], max_new_tokens: int, sampling: Sampling, context: int,
             cache: bool = True, eod: Optional[int] = None) -> Generated:
    """Up to ``max_new_tokens`` tokens after ``prompt``, read through the last ``context`` tokens; stops
    before ``eod`` (when not None). ``model`` in eval mode."""
    generator = torch.Generator().manual_seed(sampling.seed)
    step = stepper(model, context, cache)
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        token = next_token(step(tokens), sampling, generator)
        if token == eod:
            return Generated(list(prompt), tokens[len(prompt):], "eod")
        tokens.append(token)
    return Generated(list(prompt), tokens[len(prompt):], "max-new-tokens")


# --- prompts and output ------------------------------------------------------------------------------
def parse_ids(option: str, text: str) -> List[int]:
    """Token ids written as ``1,2,3`` (commas and/or whitespace)."""
    ids = []
    for part in (p for p in re.split(r"[,\s]+", text.strip()) if p):
        try:
            ids.append(int(part))
        except ValueError:
            raise ConfigError(option, f"{part[:40]!r} is not an integer token id (give ids as 1,2,3)") from None
    return ids


def read_prompt_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("--prompt-file", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("--prompt-file", f"{path}: byte offset {error.start} is not UTF-8") from None


def prompt_ids(option: str, value: str, codec, vocab: int, context: int) -> List[int]:
    """The ids of ``--prompt`` (text), ``--prompt-ids`` or ``--prompt-file`` (text with a codec, else ids),
    checked: not empty, inside [0, vocab), at most ``context`` long."""
    if option == "--prompt-file":
        value = read_prompt_file(value)
    if option == "--prompt-ids" or (option == "--prompt-file" and codec is None):
        ids = parse_ids(option, value)
    elif codec is None:
        raise ConfigError(option, "the run's data were token ids, not text (no codec to encode it): give "
                                  "--prompt-ids 1,2,3")
    else:
        ids = codec.encode(value)
    if not ids:
        raise ConfigError(option, "empty: give at least one token")
    outside = next((i for i in ids if not 0 <= i < vocab), None)
    if outside is not None:
        raise ConfigError(option, f"token id {outside} is outside the model's vocabulary [0, {vocab})")
    if len(ids) > context:
        raise ConfigError(option, f"{len(ids)} tokens, more than the model reads ({context}, its run's --seq-len)")
    return ids


def end_of_document(cfg: TrainConfig, codec) -> Optional[int]:
    """The run's end-of-document id: its --eod-id, else its codec's; None for a run on token ids without one."""
    if cfg.data.eod_id is not None:
        return cfg.data.eod_id
    return codec.eod_id if codec is not None else None


def render(result: Generated, codec) -> str:
    """The text (the prompt, then what the model wrote) with a codec, else one JSON line."""
    if codec is not None:
        return codec.decode(result.prompt + result.tokens)
    return json.dumps({"prompt": result.prompt, "generated": result.tokens, "ended": result.ended}) + "\n"


def generate_command(checkpoint: str, prompt: Tuple[str, str], max_new_tokens: int, sampling: Sampling,
                     cache: bool, stop_at_eod: bool, output: Optional[str]) -> None:
    """``distseq generate``: ``prompt`` is (its option, its value); options and ``output`` checked already."""
    from distseq.data.text import BYTES, run_codec
    from distseq.inference.export import model_from_checkpoint

    model, cfg, meta = model_from_checkpoint(Path(checkpoint))
    check_generates(model, cfg)
    task, spec = TASKS[cfg.data.task], cfg.task_spec()
    codec = run_codec(cfg.data.tokenizer)
    trained = (meta.get("data") or {}).get("codec")
    if codec is not None and trained is not None and codec.identity().get("sha256", BYTES) != trained:
        raise DataFileError(f"{cfg.data.tokenizer} is not the tokenizer.json the run trained with (its sha256 "
                            f"differs): restore that file to decode this model's ids")
    ids = prompt_ids(*prompt, codec, task.vocab(spec), spec.seq_len)
    eod = end_of_document(cfg, codec) if stop_at_eod else None
    text = render(generate(model, ids, max_new_tokens, sampling, spec.seq_len, cache, eod), codec)
    if output is None:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    else:
        write_text_atomically(Path(output), text)
