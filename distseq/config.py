"""Configuration: one dataclass per component, presets, and the one place where values are checked.

Every field carries its documentation in ``metadata["help"]``; the CLI builds its options from those
fields (``--hidden-size`` is ``ModelConfig.hidden_size``), so the help text and the code cannot
drift apart. ``TrainConfig.validate`` is the single gate every entry point goes through.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple

from .errors import ConfigError
from .registry import MODELS, TASKS
from .tasks import TaskSpec

POSITIONS = ("sinusoidal", "learned", "rope")
PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")
ON_NONFINITE = ("stop", "skip")
SHARDINGS = ("auto", "none", "ddp", "fsdp")


def _opt(default: Any, help: str, *, option: Optional[str] = None, choices: tuple = (),
         registry: Optional[str] = None) -> Any:
    """A documented field. ``option`` overrides the CLI name derived from the field name; ``registry``
    names the registry ("task" or "model") whose names are its choices, known only at run time."""
    metadata = {"help": help, "choices": choices, "registry": registry}
    if option:
        metadata["option"] = option
    return field(default=default, metadata=metadata)


@dataclass(slots=True)  # a misspelt attribute is an AttributeError, not silently ignored
class DataConfig:
    task: str = _opt("sum-sign", "synthetic task that defines inputs and labels (a registered name)",
                     registry="task")
    seq_len: int = _opt(10, "time steps per sequence (the padded length when lengths vary)")
    min_seq_len: Optional[int] = _opt(
        None, "shortest sequence; lengths are uniform in [--min-seq-len, --seq-len]; absent = all --seq-len"
    )
    vocab_size: int = _opt(8, "token vocabulary of the token tasks (mqar, induction, selective-copy) and symbols of "
                              "the copy task")
    copy_len: int = _opt(5, "symbols the copy and selective-copy tasks must recall")
    num_kv_pairs: int = _opt(8, "key-value pairs per mqar sample (each queried once)")
    dataset_size: Optional[int] = _opt(
        None,
        "number of distinct training samples, reshuffled and cycled each epoch; absent = an infinite stream",
    )
    block_size: int = _opt(
        1024,
        "samples drawn per generator block; part of the data's identity (changing it changes the samples)",
    )
    samples_per_example: int = _opt(
        16384,
        "minimum samples one datasets example carries: consecutive micro-batches of a rank are grouped "
        "to amortise the per-example cost; never changes which samples a step sees",
    )
    num_workers: int = _opt(
        0, "DataLoader worker processes per rank; 0 generates in-process (fastest for synthetic tasks)"
    )
    eval_size: int = _opt(4096, "held-out samples per evaluation (drawn with a separate key, never trained on)")
    data_files: Optional[str] = _opt(
        None,
        "train on your own parquet or JSON-lines files (paths or globs, comma-separated, in that order) instead of "
        "the synthetic stream: indexed once (cached), every row checked, reshuffled each epoch and cycled until "
        "--max-steps; --task picks the loss and the held-out set",
    )
    data_streaming: bool = _opt(
        False,
        "read --data-files once, in order, without an index (data that does not fit on local disk): training ends "
        "when a process runs out of rows, and a run resumes only on the same number of processes",
    )
    data_cache: Optional[str] = _opt(
        None, "directory of the --data-files index (default: $DISTSEQ_CACHE, else $XDG_CACHE_HOME/distseq or "
        "~/.cache/distseq; keep it on local disk)"
    )
    sequence_column: str = _opt("sequence", "column of --data-files holding each sequence (a list of numbers)")
    label_column: str = _opt("label", "column of --data-files holding each label")


@dataclass(slots=True)
class ModelConfig:
    kind: str = _opt("lstm", "sequence model (a registered name)", option="model", registry="model")
    hidden_size: int = _opt(64, "hidden units per recurrent layer; the transformer's model width")
    num_layers: int = _opt(1, "stacked recurrent or transformer layers")
    bidirectional: bool = _opt(False, "run rnn/gru/lstm layers in both directions")
    dropout: float = _opt(0.0, "dropout probability between layers and before the head (0 = none)")
    num_heads: int = _opt(4, "attention heads of the transformer (must divide --hidden-size)")
    positions: str = _opt("sinusoidal", "position encoding of transformer and decoder (rope: rotary, decoder only)",
                          choices=POSITIONS)
    tie_embeddings: bool = _opt(False, "decoder on a token task: the output layer shares the token embedding's weights")


@dataclass(slots=True)
class OptimConfig:
    lr: float = _opt(3e-3, "peak learning rate of Adam(W)")
    weight_decay: float = _opt(0.0, "decoupled weight decay (AdamW); 0 = plain Adam")
    schedule: str = _opt("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    warmup_steps: int = _opt(100, "optimizer steps of linear warmup from 0 to --lr")
    min_lr_ratio: float = _opt(0.05, "cosine floor as a fraction of --lr")
    grad_clip: float = _opt(1.0, "clip the global gradient norm to this value; 0 = no clipping")


@dataclass(slots=True)
class LoopConfig:
    run_dir: str = _opt("runs/default", "directory for TensorBoard logs, checkpoints and summary.json")
    max_steps: int = _opt(1500, "optimizer steps to train (the stream is counted in steps, not epochs)")
    start_step: int = _opt(
        0,
        "first optimizer step of a fresh start: the stream, the schedule and the step counter start there in "
        "O(1), e.g. to skip past a stretch of data (weights start fresh); a checkpoint in --run-dir sets the step "
        "instead, so a requeued job resumes",
    )
    global_batch_size: int = _opt(
        256, "samples per optimizer step across all processes (= micro-batch x processes x accumulation)"
    )
    grad_accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step on each process")
    precision: str = _opt(
        "auto", "autocast precision; auto = the fastest that works on this device", choices=PRECISIONS
    )
    seed: int = _opt(0, "seed of the data stream and of the model's initial weights")
    eval_every: int = _opt(250, "evaluate on held-out data every N optimizer steps (and at the end); 0 = only at the end")
    verify_data: bool = _opt(
        False, "all-gather a digest of the sample indices each rank consumed and check none was lost or repeated"
    )
    on_nonfinite: str = _opt(
        "stop", "a NaN/inf loss or gradient: stop = exit non-zero naming the step, saving nothing; skip = skip that "
        "optimizer step on every rank and count it (train/skipped_steps)", choices=ON_NONFINITE,
    )
    dist_timeout_s: int = _opt(
        600, "seconds a collective may wait for another process before the run fails (a dead rank never hangs it)"
    )
    expect_world_size: Optional[int] = _opt(
        None, "fail at start unless the launch produced exactly this many processes (catches launchers that "
        "silently start fewer)"
    )
    max_skipped_fraction: float = _opt(
        0.1, "under --on-nonfinite skip, stop (exit 1, one line) once more than this fraction of --max-steps "
        "was skipped: a run that mostly skips is not training"
    )
    requeue: bool = _opt(False, "under SLURM, after saving on SIGTERM/SIGUSR1/SIGHUP, ask SLURM to requeue the job")
    sharding: str = _opt(
        "auto", "how the model's state lies across processes: none = one process; ddp = every process holds the "
        "whole model, gradients are all-reduced; fsdp = parameters, gradients and optimizer state are sharded "
        "(FSDP2 per block and at the root, on CPU as on GPU); auto = fsdp under an accelerate FSDP config, "
        "else ddp on several processes, none on one", choices=SHARDINGS,
    )


@dataclass(slots=True)
class CheckpointConfig:
    checkpoint_every: int = _opt(500, "save a checkpoint every N optimizer steps (and at the end); 0 = only at the end")
    keep_last: int = _opt(3, "keep the newest K checkpoints, deleting older ones only after a new one is complete; 0 = all")
    resume: str = _opt(
        "auto",
        "auto = continue from the newest intact checkpoint in --run-dir (damaged ones are reported and skipped); "
        "never = start fresh (refused when --run-dir holds an earlier run, unless --overwrite); or the path of a "
        "checkpoint directory",
    )
    overwrite: bool = _opt(
        False, "start fresh in a --run-dir that holds an earlier run: its contents are first moved aside, in one "
        "atomic rename, to RUN.replaced-<time> beside it (nothing is deleted)"
    )
    async_checkpoint: bool = _opt(
        False, "write checkpoints in the background: the state is copied to host memory, training continues while "
        "each process writes its shard, and the checkpoint is named step-N only once the write is complete (at "
        "most one in flight; the last checkpoint of a run is waited for)"
    )


@dataclass(slots=True)
class LogConfig:
    log_every: int = _opt(50, "print one log line and write TensorBoard scalars every N optimizer steps")
    progress: Optional[bool] = _opt(
        None, "show a progress bar on the main process; absent = only when stdout and stderr are terminals (log "
        "files get plain lines)"
    )
    profile_steps: Optional[str] = _opt(
        None,
        "A:B = record a torch.profiler trace of optimizer steps A+1..B into RUN/tensorboard/profile/, print the "
        "top operators and write RUN/profile.json (where step time goes); absent = no profiling",
    )
    straggler_factor: float = _opt(
        1.5, "at log steps, say 'rank N is X× slower than the median' when the slowest rank's time per step of its "
        "own work (batch, forward and update: not the waits for the others) is this multiple of the median or more "
        "and costs a tenth of the step; 0 = never say it (perf/step_time_ms_min, _max and perf/slowest_rank are "
        "logged all the same)"
    )
    log_with: str = _opt(
        "tensorboard",
        "experiment trackers, comma-separated, run through accelerate: exactly these are used (tensorboard,mlflow "
        "adds MLflow to TensorBoard; mlflow alone drops TensorBoard); none = no tracker. TensorBoard writes "
        "RUN/tensorboard/; the others write where their own settings say (MLFLOW_TRACKING_URI, WANDB_MODE, ...)",
    )


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


@dataclass(slots=True)
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """``{"section.field": value}``; the form TensorBoard hparams and summaries use."""
        return {f"{s}.{k}": v for s, sub in self.to_dict().items() for k, v in sub.items()}

    def task_spec(self) -> TaskSpec:
        d = self.data
        return TaskSpec(d.seq_len, d.min_seq_len or d.seq_len, d.vocab_size, d.copy_len, d.num_kv_pairs)

    def micro_batch_size(self, world_size: int) -> int:
        """Samples per forward pass on one process."""
        return self.train.global_batch_size // (world_size * self.train.grad_accum_steps)

    def validate(self, world_size: int = 1) -> "TrainConfig":
        """Check every value, whatever its source (command line, config file, Python); raise ConfigError
        naming the option and what is allowed. Types first, then ranges, then combinations."""
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ConfigError("WORLD_SIZE", f"the number of processes must be an integer >= 1 (got {world_size!r})")
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ConfigError(section, f"must be a {cls.__name__} (got {getattr(self, section)!r})")
        for section in SECTIONS:
            sub = getattr(self, section)
            for f in dataclasses.fields(sub):
                value = _check_type(f, getattr(sub, f.name))
                setattr(sub, f.name, value)
                choices = f.metadata.get("choices")
                if choices and value not in choices:
                    raise ConfigError(option_name(f), f"invalid choice {value!r} (choose from {', '.join(choices)})")
        d, m, o, t = self.data, self.model, self.optim, self.train
        _in_range("--seq-len", d.seq_len, 1, MAX_SEQ_LEN)
        if d.min_seq_len is not None:
            _in_range("--min-seq-len", d.min_seq_len, 1, MAX_SEQ_LEN)
            if d.min_seq_len > d.seq_len:
                raise ConfigError("--min-seq-len", f"{d.min_seq_len} is longer than --seq-len {d.seq_len}")
        _in_range("--vocab-size", d.vocab_size, 2, MAX_VOCAB)
        _in_range("--copy-len", d.copy_len, 1, MAX_SEQ_LEN)
        _in_range("--num-kv-pairs", d.num_kv_pairs, 1, MAX_SEQ_LEN)
        if d.dataset_size is not None:
            _in_range("--dataset-size", d.dataset_size, 1, MAX_POSITION)
            if d.dataset_size // d.block_size > MAX_BLOCKS:  # each epoch's block order is one permutation
                raise ConfigError("--dataset-size", f"{d.dataset_size} samples are more than {MAX_BLOCKS} blocks of "
                                                    f"--block-size {d.block_size}; choose a larger --block-size")
        _in_range("--block-size", d.block_size, 1, MAX_POSITION)
        _in_range("--samples-per-example", d.samples_per_example, 1, MAX_POSITION)
        _in_range("--num-workers", d.num_workers, 0, MAX_WORKERS)
        _in_range("--eval-size", d.eval_size, 1, MAX_POSITION)
        _in_range("--hidden-size", m.hidden_size, 1, MAX_WIDTH)
        _in_range("--num-layers", m.num_layers, 1, MAX_LAYERS)
        _in_range("--num-heads", m.num_heads, 1, MAX_WIDTH)
        if not 0.0 <= m.dropout < 1.0:
            raise ConfigError("--dropout", f"must be in [0, 1) (got {m.dropout!r})")
        _finite("--lr", o.lr, above=0.0)
        _finite("--weight-decay", o.weight_decay, at_least=0.0)
        _in_range("--warmup-steps", o.warmup_steps, 0, MAX_POSITION)
        _finite("--grad-clip", o.grad_clip, at_least=0.0)
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ConfigError("--min-lr-ratio", f"must be between 0 and 1 (got {o.min_lr_ratio})")
        _in_range("--max-steps", t.max_steps, 1, MAX_POSITION)
        _in_range("--start-step", t.start_step, 0, MAX_POSITION)
        if t.start_step >= t.max_steps:
            raise ConfigError("--start-step", f"must be below --max-steps {t.max_steps} (got {t.start_step})")
        _in_range("--global-batch-size", t.global_batch_size, 1, MAX_POSITION)
        _in_range("--grad-accum-steps", t.grad_accum_steps, 1, MAX_POSITION)
        if t.max_steps * t.global_batch_size > MAX_POSITION:
            raise ConfigError("--max-steps", f"--max-steps x --global-batch-size = {t.max_steps * t.global_batch_size} "
                                             f"samples; stream positions must stay below 2^62")
        _in_range("--seed", t.seed, 0, MAX_SEED)
        _in_range("--eval-every", t.eval_every, 0, MAX_POSITION)
        _in_range("--dist-timeout-s", t.dist_timeout_s, 1, MAX_TIMEOUT_S)
        if t.expect_world_size is not None:
            _in_range("--expect-world-size", t.expect_world_size, 1, MAX_WORLD)
        if not 0.0 <= t.max_skipped_fraction <= 1.0:
            raise ConfigError("--max-skipped-fraction", f"must be between 0 and 1 (got {t.max_skipped_fraction})")
        if t.sharding == "none" and world_size > 1:
            raise ConfigError("--sharding", f"none trains on one process; this launch started {world_size} "
                                            f"(choose ddp, fsdp or auto)")
        if t.precision == "fp16" and t.sharding in ("fsdp", "auto"):
            from .sharding import resolve_sharding  # auto follows the launch (an FSDP config)

            if resolve_sharding(t.sharding, world_size) == "fsdp":
                raise ConfigError("--precision", f"fp16 needs a gradient scaler that FSDP2's sharded gradients do not "
                                                 f"have here; under --sharding {t.sharding}"
                                                 f"{' (fsdp: an FSDP launch)' if t.sharding == 'auto' else ''} choose "
                                                 f"--precision bf16, no or auto")
        c = self.checkpoint
        _in_range("--checkpoint-every", c.checkpoint_every, 0, MAX_POSITION)
        _in_range("--keep-last", c.keep_last, 0, MAX_POSITION)
        if not c.resume:
            raise ConfigError("--resume", "expected auto, never or a checkpoint directory (got an empty string)")
        if c.resume not in ("auto", "never") and not Path(c.resume).is_dir():
            raise ConfigError("--resume", f"expected auto, never or a checkpoint directory (got {c.resume})")
        if c.overwrite and c.resume not in ("auto", "never"):
            raise ConfigError("--overwrite", "starts fresh; it cannot be combined with --resume PATH")
        if t.start_step and c.resume not in ("auto", "never"):
            raise ConfigError("--start-step", "applies to a fresh start; a checkpoint given to --resume sets the step")
        _in_range("--log-every", self.log.log_every, 1, MAX_POSITION)
        factor = self.log.straggler_factor
        if factor != 0 and not (math.isfinite(factor) and factor > 1.0):
            raise ConfigError("--straggler-factor", f"must be a finite number > 1, or 0 to never report a slow rank "
                                                    f"(got {factor!r})")
        self.profile_range()
        self.trackers()
        if not t.run_dir.strip():
            raise ConfigError("--run-dir", "must not be empty")
        per_step = world_size * t.grad_accum_steps
        if t.global_batch_size % per_step:
            raise ConfigError(
                "--global-batch-size",
                f"{t.global_batch_size} is not divisible by processes x --grad-accum-steps = "
                f"{world_size} x {t.grad_accum_steps} = {per_step}",
            )
        # what only the chosen task and model know: each registered thing checks its own options
        for registered in (TASKS.get(d.task), MODELS.get(m.kind)):
            check = getattr(registered, "validate", None)
            if isinstance(registered, type) and not isinstance(inspect.getattr_static(registered, "validate", None),
                                                             (staticmethod, classmethod)):
                check = None  # an nn.Module's own validate(self, ...) method is not the config hook
            if check is not None:
                check(self)
        task = TASKS[d.task]
        step_bytes = task.input_bytes(self.task_spec())
        for option, samples in (("--block-size", d.block_size), ("--samples-per-example", d.samples_per_example),
                                ("--eval-size", -(-d.eval_size // world_size)),  # each rank's share at once
                                ("--global-batch-size", self.micro_batch_size(world_size))):
            _fits_in_memory(option, samples, d.seq_len, step_bytes, task.tokens)
        if task.head == "per-step":  # float32 logits per step and output: a large vocabulary's dominate
            logits = self.micro_batch_size(world_size) * d.seq_len * task.num_outputs(self.task_spec()) * 4
            if logits > MAX_TENSOR_BYTES:
                raise ConfigError("--global-batch-size", f"one micro-batch's logits ({self.micro_batch_size(world_size)} "
                                  f"samples x {d.seq_len} steps x {task.num_outputs(self.task_spec())} outputs of "
                                  f"float32) take {logits / 2**30:.0f} GiB (limit {MAX_TENSOR_BYTES // 2**30} GiB); "
                                  f"choose a smaller --global-batch-size (or more --grad-accum-steps), --seq-len or "
                                  f"--vocab-size")
        if d.data_files is not None:
            self._validate_data_files()
        elif d.data_streaming:
            raise ConfigError("--data-streaming", "applies to --data-files only; give --data-files or leave it out")
        if Path(t.run_dir).exists() and not Path(t.run_dir).is_dir():
            raise ConfigError("--run-dir", f"{t.run_dir} exists and is not a directory")
        return self

    def profile_range(self) -> Optional[Tuple[int, int]]:
        """``--profile-steps A:B`` as (A, B), None when absent; ConfigError unless 0 <= A < B <= --max-steps."""
        text, max_steps = self.log.profile_steps, self.train.max_steps
        if text is None:
            return None
        first, sep, last = str(text).partition(":")
        if not (sep and first.strip().isascii() and first.strip().isdecimal() and last.strip().isascii()
                and last.strip().isdecimal()):
            raise ConfigError("--profile-steps", f"expected A:B with integers 0 <= A < B <= --max-steps (got {text!r})")
        if not int(first) < int(last) <= max_steps:
            raise ConfigError("--profile-steps", f"expected 0 <= A < B <= --max-steps {max_steps} (got {text!r})")
        return int(first), int(last)

    def trackers(self) -> list:
        """``--log-with`` as a list of tracker names ([] for none); ConfigError unless each is a tracker
        accelerate knows (its ``LOGGER_TYPE_TO_CLASS``, custom registered ones included) and accelerate
        finds its package here: accelerate itself would drop a missing one without a word."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        text = self.log.log_with
        names = list(dict.fromkeys(name.strip() for name in text.split(",")))  # in order, repeats once
        if names == ["none"]:
            return []
        known = sorted(LOGGER_TYPE_TO_CLASS)
        available = {str(t) for t in get_available_trackers()}
        for name in names:
            if name == "none":
                raise ConfigError("--log-with", f"none means no tracker; it cannot be combined with others "
                                                f"(got {text!r})")
            if name not in known:
                what = f"an empty name in {text!r}" if not name else f"unknown tracker {name!r}"
                raise ConfigError("--log-with", f"{what} (choose from {', '.join(known)}, or none; comma-separated)")
            if name not in available and name in _TRACKER_PACKAGES:  # a custom registered tracker is always there
                raise ConfigError("--log-with", f"{name} is not installed: pip install {_TRACKER_PACKAGES[name]}")
        return names

    def _validate_data_files(self) -> None:
        from .files import check_files, resolve_files  # reads the first row: only when files are used

        d = self.data
        if d.data_cache is not None and not d.data_cache.strip():
            raise ConfigError("--data-cache", "is empty: give a directory, or leave it out for the default")
        streamed = "does not apply with --data-files --data-streaming; leave it out"
        conflicts = {  # option: (given, why not)
            "--dataset-size": (d.dataset_size is not None,
                               "does not apply with --data-files (the files' rows are the dataset); leave it out"),
            # streamed rows are read in-process so that their order and resume state stay exact, and they carry
            # no stream positions to verify
            "--num-workers": (d.data_streaming and d.num_workers != 0, streamed),
            "--verify-data": (d.data_streaming and self.train.verify_data, streamed),
        }
        for option, (given, why_not) in conflicts.items():
            if given:
                raise ConfigError(option, why_not)
        if TASKS[d.task].tokens:
            raise ConfigError("--task", f"--data-files hold sequences of numbers; {d.task} takes token ids")
        if TASKS[d.task].head == "per-step":
            raise ConfigError("--task", f"--data-files needs one label per sequence; {d.task} has one per step")
        check_files(resolve_files(d.data_files), d.sequence_column, d.label_column)


def _did_you_mean(name, choices) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(choices)})"


def read_config_file(path: str) -> dict:
    """A config file's sections as a dict: JSON (.json) or YAML (anything else)."""
    if Path(path).exists() and not Path(path).is_file():
        raise ConfigError("--config", f"{path} is not a regular file")
    try:
        if Path(path).stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError("--config", f"{path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file")
        text = Path(path).read_text()
    except OSError as error:
        raise ConfigError("--config", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"cannot read {path}: not UTF-8 text") from None
    try:
        if path.endswith(".json"):
            loaded = json.loads(text)
        else:
            import yaml

            loaded = yaml.safe_load(text)
    except Exception as error:  # json.JSONDecodeError, yaml.YAMLError: one line naming the file
        raise ConfigError("--config", f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                                      f"{str(error).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of sections ({', '.join(SECTIONS)})")
    return loaded


def apply_mapping(cfg: TrainConfig, mapping: dict, source: str) -> TrainConfig:
    """Set ``{section: {field: value}}`` on ``cfg``; an unknown name is an error naming the nearest valid one."""
    for section, values in mapping.items():
        if section not in SECTIONS:
            raise ConfigError("--config", f"{source}: unknown section {section!r}{_did_you_mean(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError("--config", f"{source}: section {section!r} must be a mapping of fields")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for name, value in values.items():
            if name not in fields:
                raise ConfigError("--config", f"{source}: unknown key {section}.{name}{_did_you_mean(name, fields)}")
            if fields[name].type in ("float", "Optional[float]") and isinstance(value, str):
                value = _yaml_float(value)
            setattr(getattr(cfg, section), name, value)
    return cfg


# Bounds that keep every value inside what the code can represent or this kind of machine can hold;
# beyond them a value is a typo, and an error beats an overflow deep inside torch.
MAX_POSITION = 2**62  # stream positions are int64
MAX_SEED = 2**63 - 1
MAX_SEQ_LEN = 2**20
MAX_VOCAB = 2**24
MAX_WIDTH = 2**16
MAX_LAYERS = 1024
MAX_WORKERS = 256
MAX_WORLD = 2**20
MAX_TIMEOUT_S = 365 * 24 * 3600
MAX_BLOCKS = 2**30  # blocks in one epoch of a finite --dataset-size
MAX_TENSOR_BYTES = 8 * 2**30  # one block, example, micro-batch or evaluation set of inputs

MAX_CONFIG_BYTES = 2**20

_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}

# accelerate's built-in trackers (utils.LoggerType) and what to install for each
_TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "comet_ml": "comet-ml",
    "aim": "'aim<4'", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}


def _check_type(f: dataclasses.Field, value: Any) -> Any:
    """``value`` if it has the field's type (an int is a valid float; None only where optional)."""
    kind = f.type
    optional = kind.startswith("Optional[")
    base = kind[len("Optional["):-1] if optional else kind
    if value is None and optional:
        return value
    if base == "str" and isinstance(value, os.PathLike):  # pathlib.Path from Python
        value = os.fspath(value)
    if base in ("int", "float") and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)  # numpy integers from Python
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[base]
    if not ok:
        absent = " or absent" if optional else ""
        hint = " (YAML reads yes/no/on/off as booleans and 1:3 as a number: quote it)" if (
            base == "str" and isinstance(value, (bool, int))) else ""
        raise ConfigError(option_name(f), f"must be {_TYPE_NAMES[base]}{absent} (got {value!r}){hint}")
    return float(value) if base == "float" else value


def _in_range(option: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(option, f"must be an integer >= {low}" + (f" and <= {high}" if value > high else "")
                          + f" (got {value!r})")


def _finite(option: str, value: float, *, above: Optional[float] = None, at_least: Optional[float] = None) -> None:
    if above is not None and not (math.isfinite(value) and value > above):
        raise ConfigError(option, f"must be a finite number > {above:g} (got {value!r})")
    if at_least is not None and not (math.isfinite(value) and value >= at_least):
        raise ConfigError(option, f"must be a finite number >= {at_least:g} (got {value!r})")


def _fits_in_memory(option: str, samples: int, seq_len: int, step_bytes: int, tokens: bool) -> None:
    size = samples * seq_len * step_bytes
    if size > MAX_TENSOR_BYTES:
        what = "int64 tokens" if tokens else f"{step_bytes // 4} features of float32"
        raise ConfigError(option, f"{samples} samples x {seq_len} steps x {what} take "
                                  f"{size / 2**30:.0f} GiB at once (limit {MAX_TENSOR_BYTES // 2**30} GiB); choose "
                                  f"a smaller value")


def _yaml_float(text: str):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; a float field takes it as the number it spells."""
    try:
        return float(text)
    except ValueError:
        return text  # left for validate() to report with the option's name


def option_name(f: dataclasses.Field) -> str:
    """The command-line spelling of a field: ``hidden_size`` -> ``--hidden-size``."""
    return "--" + f.metadata.get("option", f.name).replace("_", "-")


def option_for(key: str) -> str:
    """The command-line spelling of ``"section.field"``."""
    section, name = key.split(".")
    return next(option_name(f) for f in dataclasses.fields(SECTIONS[section]) if f.name == name)


def _seed_preset() -> TrainConfig:
    """The original example, done right: nn.RNN(1, 32), seq 10, batch 32, Adam lr 0.01, 1,000 samples x 10 epochs."""
    return TrainConfig(
        data=DataConfig(task="sum-sign", seq_len=10, dataset_size=1000),
        model=ModelConfig(kind="rnn", hidden_size=32, num_layers=1),
        optim=OptimConfig(lr=0.01, schedule="constant", warmup_steps=0, grad_clip=0.0),
        # 1,000 samples in batches of 32 are 32 batches an epoch (the last one short); 10 epochs = 320 steps.
        # fp32 like the original (on CPU, auto would pick bf16 where it runs; for this small RNN it is slower)
        train=LoopConfig(run_dir="runs/seed", max_steps=320, global_batch_size=32, eval_every=32, precision="no"),
        log=LogConfig(log_every=32),
    )


def _default_preset() -> TrainConfig:
    """What the harness is for: an LSTM on the infinite streamed sum-sign task."""
    return TrainConfig()


def _token_preset(task: str, seq_len: int, vocab_size: int, max_steps: int, batch: int, **data) -> TrainConfig:
    """A causal decoder (2 layers, width 64, 2 heads, rotary positions) on a token task, sized for a CPU:
    AdamW 3e-3 without weight decay, 100 warmup steps, fp32 (bf16 is slower on most CPUs)."""
    return TrainConfig(
        data=DataConfig(task=task, seq_len=seq_len, vocab_size=vocab_size, eval_size=1024, **data),
        model=ModelConfig(kind="decoder", hidden_size=64, num_layers=2, num_heads=2, positions="rope"),
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
