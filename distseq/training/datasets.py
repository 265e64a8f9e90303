"""Which data a run trains and evaluates on: the synthetic stream, indexed ``--data-files`` (rows, or the token
windows of ``--task lm``), and the held-out set (the task's synthetic one, ``--eval-files``, or the
``--eval-share`` of the files that training never sees: the last samples in the files' order).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple, Union

from distseq.config import TrainConfig
from distseq.config.checks import DEFAULT_LM_SHARE
from distseq.data.files import resolve_files
from distseq.data.index import FileIndex, FileSource, open_index
from distseq.data.stream import SampleSource, eval_batches
from distseq.data.text import BYTES, run_codec
from distseq.data.tokens import TokenIndex, TokenLayout, check_token_files, open_token_index
from distseq.distributed.accelerator import show_progress
from distseq.errors import ConfigError
from distseq.registry import TASKS
from distseq.tasks import Batch

Index = Union[FileIndex, TokenIndex]


def open_data_files(cfg: TrainConfig, pattern: str, option: str = "--data-files", quiet: bool = False) -> Index:
    """The index of ``pattern`` as the run reads its files (built where missing or stale), ready to read: rows, or
    --task lm's windows of files of the run's kind (text through its codec, or token ids). Before the Accelerator
    exists, so the launch's RANK says who prints."""
    d, task, spec = cfg.data, TASKS[cfg.data.task], cfg.task_spec()
    main = os.environ.get("RANK", "0") == "0" and not quiet
    say = (lambda line: print(line, flush=True)) if main else (lambda line: None)
    progress = main and show_progress(cfg.log.progress)
    if not task.language_model:
        return open_index(resolve_files(pattern, option), task, spec, d.sequence_column, d.label_column, d.data_cache,
                          say=say, progress=progress).open()
    files = resolve_files(pattern, option, tokens=True)
    check_token_files(files, option, text=d.tokenizer is not None)  # validate resolved the codec of text
    codec = run_codec(d.tokenizer)
    layout = TokenLayout("tokens", d.sequence_column, task.vocab(spec), d.eod_id, d.token_dtype,
                         "none" if codec is None else codec.identity().get("sha256", BYTES))
    return open_token_index(files, layout, codec, spec.seq_len, d.packing, d.data_cache, say, progress, option)


def open_files(cfg: TrainConfig) -> Optional[Index]:
    """The run's training files, indexed (and its --eval-files, so that their bad data too is found before anything
    of the run is written); None for the synthetic stream or --data-streaming. A held-out share that would leave
    nothing to train on is refused here, where the count of samples is known."""
    d = cfg.data
    if not d.data_files or d.data_streaming:
        return None
    index = open_data_files(cfg, d.data_files)
    if d.eval_files is not None:
        open_data_files(cfg, d.eval_files, "--eval-files")
    held = held_out_count(cfg, index)
    if held >= index.rows:
        default = " (--task lm's default without --eval-files)" if d.eval_share == DEFAULT_LM_SHARE else ""
        raise ConfigError("--eval-share", f"{d.eval_share}{default} of {index.rows} samples holds out {held}: "
                                          f"nothing is left to train on (give more data, or --eval-files)")
    return index


def held_out_count(cfg: TrainConfig, index: Index) -> int:
    """Samples of the files held out for evaluation: at least one when there is a share."""
    share = cfg.data.eval_share
    return 0 if share is None else max(1, math.ceil(share * index.rows))


def train_source(cfg: TrainConfig, index: Index) -> FileSource:
    """The files' samples training reads: all but the held-out share, reshuffled each epoch."""
    return FileSource(index, cfg.train.seed, cfg.task_spec().variable, 0, index.rows - held_out_count(cfg, index))


def needs_files(cfg: TrainConfig) -> bool:
    """Whether the held-out set is a share of the training files (which must then be indexed to find it)."""
    return bool(cfg.data.data_files) and not cfg.data.data_streaming and cfg.data.eval_share is not None


def held_out(cfg: TrainConfig, index: Optional[Index], rank: int, world: int, batch_size: int,
             eval_size: Optional[int] = None) -> Tuple[List[Batch], int, str]:
    """This rank's held-out batches, how many samples they hold in all, and what they are: --eval-files (their
    first --eval-size samples, in order), the files' held-out share (likewise), or the task's synthetic set."""
    d, spec = cfg.data, cfg.task_spec()
    size = eval_size or d.eval_size
    if d.eval_files is not None:
        evaluated = open_data_files(cfg, d.eval_files, "--eval-files", quiet=True)  # opened before, by open_files
        source, what = FileSource(evaluated, None, spec.variable), d.eval_files
    elif index is not None and held_out_count(cfg, index):
        held = held_out_count(cfg, index)
        source = FileSource(index, None, spec.variable, index.rows - held, held)
        what = f"the last {held} of {index.rows} samples of --data-files"
    else:
        source, what = SampleSource(d.task, spec, cfg.train.seed, d.block_size, "eval"), "held-out stream"
        return eval_batches(source, rank, world, size, batch_size), size, what
    expected = min(size, source.count)
    return eval_batches(source, rank, world, expected, batch_size), expected, what
