"""The run's configuration, one dataclass per component (gathered in ``TrainConfig``, ``run_config.py``).

Every field states its facts once (``distseq.options.option``: help, flag, bounds, what a resume does
with it; the type from its annotation). The chosen task and model add options of their own, declared
at registration: they are read and set like fields (``cfg.model.positions``, ``cfg.data.num_kv_pairs``)
and kept in the section's ``options`` (those set explicitly; the component's defaults fill in the
rest). ``TrainConfig.validate`` (``checks.py``) is the single gate every source goes through.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from distseq.errors import ConfigError
from distseq.options import (
    CHANGEABLE,
    IDENTITY,
    MAX_LAYERS,
    MAX_POSITION,
    MAX_SEED,
    MAX_SEQ_LEN,
    MAX_TIMEOUT_S,
    MAX_VOCAB,
    MAX_WIDTH,
    MAX_WORKERS,
    MAX_WORLD,
    PER_START,
    Fact,
    facts,
    flag_of,
    legacy_default,
    option,
)
from distseq.registry import MODELS, TASKS, Registry

PRECISIONS = ("auto", "no", "bf16", "fp16")


def component_options() -> Any:
    """The section field that holds the chosen component's own options (not an option itself)."""
    return field(default_factory=dict, metadata={"component_options": True})


class _OwnsOptions:
    """A section whose chosen component (the task, the model) may declare options of its own (a dataclass
    given at registration). They are set and read like fields; ``options`` holds those set explicitly, by
    name, and the chosen component's defaults fill in the rest. Nothing set is ever dropped: an option the
    chosen component does not declare is refused at validation (``config/checks.py``), whatever the order
    in which the component and the option were set. A name no registered component declares is an
    AttributeError, as a misspelt field is."""

    __slots__ = ()
    _component: str = ""  # the field naming the chosen component
    _registry: Registry = TASKS
    _section: str = "data"

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))  # a copy (replace() of a section shares none)

    def component(self) -> str:
        return object.__getattribute__(self, self._component)

    def option_facts(self) -> Tuple[Fact, ...]:
        """The facts of the chosen component's own options (none when it declares none)."""
        declared = self._registry.options(self.component())
        return facts(declared) if declared is not None else ()

    def own_options(self) -> Dict[str, Any]:
        """The chosen component's options as they apply: its defaults, then those set."""
        options = object.__getattribute__(self, "options")
        return {f.name: options.get(f.name, f.default) for f in self.option_facts()}

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        if name.startswith("_"):
            raise AttributeError(name)
        options = object.__getattribute__(self, "options")
        if name in options:
            return options[name]
        try:
            declared = self.option_facts()
        except ConfigError as unknown:  # an unregistered component: no option to read (hasattr is False)
            raise AttributeError(str(unknown)) from None
        for f in declared:
            if f.name == name:
                return f.default
        try:
            return legacy_default(self._section, name, f"{self._registry.kind} {self.component()!r}")
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}, and {self._registry.kind} "
                                 f"{self.component()!r} declares no such option") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in section_fields(type(self)) or name == "options":
            object.__setattr__(self, name, value)
        elif name in self._registry.declared_options():
            self.options[name] = value
        else:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}, and no registered "
                                 f"{self._registry.kind} declares such an option")


@dataclass(slots=True)  # a misspelt attribute is an AttributeError, not silently ignored
class DataConfig(_OwnsOptions):
    task: str = option("sum-sign", "synthetic task that defines inputs and labels (a registered name)",
                       registry="task")
    seq_len: int = option(10, "time steps per sequence (the padded length when lengths vary)", low=1,
                          high=MAX_SEQ_LEN)
    min_seq_len: Optional[int] = option(
        None, "shortest sequence; lengths are uniform in [--min-seq-len, --seq-len]; absent = all --seq-len",
        low=1, high=MAX_SEQ_LEN)
    vocab_size: int = option(8, "token vocabulary of the token tasks (mqar, induction, selective-copy, lm; text sets "
                                "it from its codec) and symbols of the copy task", low=2, high=MAX_VOCAB)
    dataset_size: Optional[int] = option(
        None, "number of distinct training samples, reshuffled and cycled each epoch; absent = an infinite stream",
        low=1, high=MAX_POSITION)
    block_size: int = option(
        1024, "samples drawn per generator block; part of the data's identity (changing it changes the samples)",
        low=1, high=MAX_POSITION)
    samples_per_example: int = option(
        16384, "minimum samples one datasets example carries: consecutive micro-batches of a rank are grouped to "
        "amortise the per-example cost; never changes which samples a step sees", resume=CHANGEABLE, low=1,
        high=MAX_POSITION)
    num_workers: int = option(
        0, "DataLoader worker processes per rank; 0 generates in-process (fastest for synthetic tasks)",
        resume=CHANGEABLE, low=0, high=MAX_WORKERS)
    eval_size: int = option(4096, "held-out samples per evaluation (drawn with a separate key, never trained on)",
                            resume=CHANGEABLE, low=1, high=MAX_POSITION)
    data_files: Optional[str] = option(
        None, "train on your own files (paths or globs, comma-separated, in that order) instead of the synthetic "
        "stream: parquet or JSON-lines rows (a sequence and its label), or for --task lm token files (.bin, lists of "
        "ids in parquet/JSON lines) or text (.txt); indexed once (cached), every row checked, reshuffled each epoch "
        "and cycled until --max-steps; --task picks the loss")
    data_streaming: bool = option(
        False, "read --data-files once, in order, without an index (data that does not fit on local disk): training "
        "ends when a process runs out of rows, and a run resumes only on the same number of processes")
    data_cache: Optional[str] = option(
        None, "directory of the --data-files index (default: $DISTSEQ_CACHE, else $XDG_CACHE_HOME/distseq or "
        "~/.cache/distseq; keep it on local disk)", resume=CHANGEABLE)
    sequence_column: str = option("sequence", "column of --data-files holding each sequence (a list of numbers, "
                                              "or of token ids)")
    label_column: str = option("label", "column of --data-files holding each label (a list per position for a "
                                        "per-step task, the ignore index -100 or null where there is none)")
    eval_files: Optional[str] = option(
        None, "held-out files of the same kind as --data-files (paths or globs, comma-separated), evaluated in "
        "their order (their first --eval-size samples) instead of a held-out share of --data-files or the task's "
        "synthetic held-out set", resume=CHANGEABLE)
    eval_share: Optional[float] = option(
        None, "share of the --data-files' samples (rows, or windows of --task lm) held out for evaluation and never "
        "trained on: the last ones in the files' order (default: 0.05 for --task lm without --eval-files, else none)",
        above=0.0, below=1.0)
    tokenizer: Optional[str] = option(
        None, "a tokenizer.json (the tokenizers library, read from the file: nothing is downloaded) that reads .txt "
        "--data-files; absent or 'bytes': their bytes (vocabulary 256, byte 0 ends a document). A resume compares the "
        "ids, not the path", resume=CHANGEABLE)
    token_dtype: Literal["uint16", "uint32"] = option(
        "uint16", "token ids of a .bin --data-files (a flat array, as nanoGPT's prepare.py writes; NAME.offsets.npy "
        "beside it, int64 document starts, is read when present)")
    eod_id: Optional[int] = option(
        None, "--task lm: the end-of-document id packed after each document (default: byte 0 for bytes, the "
        "tokenizer's end-of-text token, none for token files, whose documents are then joined as they are)",
        low=0, high=MAX_VOCAB - 1)
    packing: Literal["packed", "document"] = option(
        "packed", "--task lm: windows of --seq-len + 1 tokens across document boundaries (packed), or within each "
        "document, padded at its end and never trained on there (document)")
    options: Dict[str, Any] = component_options()  # the task's own options set explicitly (see _OwnsOptions)

    _component = "task"
    _registry = TASKS
    _section = "data"


@dataclass(slots=True)
class ModelConfig(_OwnsOptions):
    kind: str = option("lstm", "sequence model (a registered name)", flag="model", registry="model")
    hidden_size: int = option(64, "hidden units per recurrent layer; the attention models' width", low=1,
                              high=MAX_WIDTH)
    num_layers: int = option(1, "stacked recurrent or attention layers", low=1, high=MAX_LAYERS)
    dropout: float = option(0.0, "dropout probability between layers and before the head (0 = none)",
                            resume=CHANGEABLE, low=0.0, below=1.0)
    options: Dict[str, Any] = component_options()  # the model's own options set explicitly (see _OwnsOptions)

    _component = "kind"
    _registry = MODELS
    _section = "model"


@dataclass(slots=True)
class OptimConfig:
    lr: float = option(3e-3, "peak learning rate of Adam(W)", resume=CHANGEABLE, above=0.0)
    weight_decay: float = option(0.0, "decoupled weight decay (AdamW); 0 = plain Adam", resume=CHANGEABLE, low=0.0)
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule after warmup",
                                                     resume=CHANGEABLE)
    warmup_steps: int = option(100, "optimizer steps of linear warmup from 0 to --lr", resume=CHANGEABLE, low=0,
                               high=MAX_POSITION)
    min_lr_ratio: float = option(0.05, "cosine floor as a fraction of --lr", resume=CHANGEABLE, low=0.0, high=1.0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this value; 0 = no clipping",
                              resume=CHANGEABLE, low=0.0)


@dataclass(slots=True)
class LoopConfig:
    run_dir: str = option("runs/default", "directory for TensorBoard logs, checkpoints and summary.json",
                          resume=PER_START)
    max_steps: int = option(1500, "optimizer steps to train (the stream is counted in steps, not epochs)",
                            resume=CHANGEABLE, low=1, high=MAX_POSITION)
    start_step: int = option(
        0, "first optimizer step of a fresh start: the stream, the schedule and the step counter start there in "
        "O(1), e.g. to skip past a stretch of data (weights start fresh); a checkpoint in --run-dir sets the step "
        "instead, so a requeued job resumes", resume=PER_START, low=0, high=MAX_POSITION)
    global_batch_size: int = option(
        256, "samples per optimizer step across all processes (= micro-batch x processes x accumulation)", low=1,
        high=MAX_POSITION)
    grad_accum_steps: int = option(1, "micro-batches accumulated per optimizer step on each process",
                                   resume=CHANGEABLE, low=1, high=MAX_POSITION)
    precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", "autocast precision; auto = the fastest that works on this device", resume=CHANGEABLE)
    seed: int = option(0, "seed of the data stream and of the model's initial weights", low=0, high=MAX_SEED)
    eval_every: int = option(
        250, "evaluate on held-out data every N optimizer steps (and at the end); 0 = only at the end",
        resume=CHANGEABLE, low=0, high=MAX_POSITION)
    stop_at: Optional[str] = option(
        None, "end the run at the first evaluation where a held-out metric reaches a value: METRIC>=VALUE or "
        "METRIC<=VALUE (eval/accuracy>=0.99, eval/loss<=0.05); saved, stopped_at in summary.json, exit 0. "
        "Needs --eval-every > 0", resume=CHANGEABLE)
    verify_data: bool = option(
        False, "all-gather a digest of the sample indices each rank consumed and check none was lost or repeated",
        resume=CHANGEABLE)
    on_nonfinite: Literal["stop", "skip"] = option(
        "stop", "a NaN/inf loss or gradient: stop = exit non-zero naming the step, saving nothing; skip = skip that "
        "optimizer step on every rank and count it (train/skipped_steps)", resume=CHANGEABLE)
    dist_timeout_s: int = option(
        600, "seconds a collective may wait for another process before the run fails (a dead rank never hangs it)",
        resume=CHANGEABLE, low=1, high=MAX_TIMEOUT_S)
    expect_world_size: Optional[int] = option(
        None, "fail at start unless the launch produced exactly this many processes (catches launchers that "
        "silently start fewer)", resume=CHANGEABLE, low=1, high=MAX_WORLD)
    max_skipped_fraction: float = option(
        0.1, "under --on-nonfinite skip, stop (exit 1, one line) once more than this fraction of --max-steps was "
        "skipped: a run that mostly skips is not training", resume=CHANGEABLE, low=0.0, high=1.0)
    requeue: bool = option(False, "under SLURM, after saving on SIGTERM/SIGUSR1/SIGHUP, ask SLURM to requeue the job",
                           resume=CHANGEABLE)
    sharding: Literal["auto", "none", "ddp", "fsdp"] = option(
        "auto", "how the model's state lies across processes: none = one process; ddp = every process holds the "
        "whole model, gradients are all-reduced; fsdp = parameters, gradients and optimizer state are sharded "
        "(FSDP2 per block and at the root, on CPU as on GPU); auto = fsdp under an accelerate FSDP config, else ddp "
        "on several processes, none on one", resume=CHANGEABLE)
    compile: bool = option(
        False, "compile the model with torch.compile (inductor): each block under --sharding fsdp, the whole model "
        "otherwise; compiling is the start-up phase 'compile' (not training time), evaluation runs eagerly, and "
        "checkpoints are the same as without (a run resumes with or without it)", resume=CHANGEABLE)
    compile_backend: Literal["inductor", "aot_eager", "eager"] = option(
        "inductor", "torch.compile's backend under --compile: inductor generates fused kernels (the speed); aot_eager "
        "and eager only capture the graphs (dynamo, and AOTAutograd's backward) and run them eagerly: seconds to "
        "compile, to check that a model compiles", resume=CHANGEABLE)
    activation_checkpointing: Literal["none", "full", "selective"] = option(
        "none", "keep fewer activations for the backward and recompute them: full = each block keeps only its "
        "input; selective = each block keeps its matrix multiplies' and attention's outputs and recomputes the "
        "rest; same results, less memory, more compute", resume=CHANGEABLE)


@dataclass(slots=True)
class CheckpointConfig:
    checkpoint_every: int = option(
        500, "save a checkpoint every N optimizer steps (and at the end); 0 = only at the end", resume=CHANGEABLE,
        low=0, high=MAX_POSITION)
    keep_last: int = option(
        3, "keep the newest K checkpoints, deleting older ones only after a new one is complete; 0 = all",
        resume=CHANGEABLE, low=0, high=MAX_POSITION)
    resume: str = option(
        "auto", "auto = continue from the newest intact checkpoint in --run-dir (damaged ones are reported and "
        "skipped); never = start fresh (refused when --run-dir holds an earlier run, unless --overwrite); or the "
        "path of a checkpoint directory", resume=PER_START)
    overwrite: bool = option(
        False, "start fresh in a --run-dir that holds an earlier run: its contents are first moved aside, in one "
        "atomic rename, to RUN.replaced-<time> beside it (nothing is deleted)", resume=PER_START)
    async_checkpoint: bool = option(
        False, "write checkpoints in the background: the state is copied to host memory, training continues while "
        "each process writes its shard, and the checkpoint is named step-N only once the write is complete (at most "
        "one in flight; the last checkpoint of a run is waited for)", resume=CHANGEABLE)


@dataclass(slots=True)
class LogConfig:
    log_every: int = option(50, "print one log line and write TensorBoard scalars every N optimizer steps",
                            resume=CHANGEABLE, low=1, high=MAX_POSITION)
    progress: Optional[bool] = option(
        None, "show a progress bar on the main process; absent = only when stdout and stderr are terminals (log "
        "files get plain lines)", resume=CHANGEABLE)
    profile_steps: Optional[str] = option(
        None, "A:B = record a torch.profiler trace of optimizer steps A+1..B into RUN/tensorboard/profile/, print "
        "the top operators and write RUN/profile.json (where step time goes); absent = no profiling",
        resume=CHANGEABLE)
    straggler_factor: float = option(
        1.5, "at log steps, say 'rank N is X× slower than the median' when the slowest rank's time per step of its "
        "own work (batch, forward and update: not the waits for the others) is this multiple of the median or more "
        "and costs a tenth of the step; 0 = never say it (the ranks' figures are logged all the same)",
        resume=CHANGEABLE)
    log_with: str = option(
        "tensorboard", "experiment trackers, comma-separated, run through accelerate: exactly these are used "
        "(tensorboard,mlflow adds MLflow to TensorBoard; mlflow alone drops TensorBoard); none = no tracker. "
        "TensorBoard writes RUN/tensorboard/; the others write where their own settings say (MLFLOW_TRACKING_URI, "
        "WANDB_MODE, ...)", resume=CHANGEABLE)
    tracker_timeout_s: float = option(
        60.0, "seconds the trackers of --log-with other than TensorBoard may take to start (an MLflow or W&B server "
        "that does not answer): past it the run stops with one line naming the tracker and its address. Below "
        "--dist-timeout-s: the other processes wait that long for the main one", low=0.1, high=MAX_TIMEOUT_S,
        resume=CHANGEABLE)


SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
}


@functools.lru_cache(maxsize=None)
def section_fields(cls: type) -> Tuple[str, ...]:
    """The names of a section's fields (its options, and ``options`` where a component owns some)."""
    return tuple(f.name for f in dataclasses.fields(cls))


def option_for(key: str) -> str:
    """The command-line spelling of ``"section.name"`` (a field, or the chosen component's own option)."""
    section, name = key.split(".")
    for f in facts(SECTIONS[section]):
        if f.name == name:
            return f.flag
    return flag_of(name)


def component_option_facts(registry: Registry) -> Dict[str, Tuple[Fact, List[str]]]:
    """``{name: (facts, owners)}`` of the options the registry's entries declare, each name once. Options
    of one name must agree in kind (one flag takes one type), and none may take the name of a config
    field: a ConfigError naming the component, one line."""
    fields = {f.name for cls in SECTIONS.values() for f in facts(cls)}
    other = MODELS if registry is TASKS else TASKS
    others = other.declared_options()
    out: Dict[str, Tuple[Fact, List[str]]] = {}
    for name, owners in registry.declared_options().items():
        if name in fields or name in others:
            what = f"distseq's {flag_of(name)}" if name in fields else f"an option of {other.kind} {others[name][0]!r}"
            raise ConfigError("--import", f"{registry.kind} {owners[0]!r} declares an option {name!r}, which is "
                                          f"already {what}; rename it")
        kinds = {(f.kind, f.optional) for owner in owners for f in facts(registry.options(owner)) if f.name == name}
        if len(kinds) > 1:
            raise ConfigError("--import", f"{registry.kind}s {', '.join(owners)} declare option {name!r} with "
                                          f"different types; one flag takes one type: rename one of them")
        first = registry.options(owners[0])
        out[name] = (next(f for f in facts(first) if f.name == name), owners)
    return out


def owner_section(section: str) -> Optional[Registry]:
    """The registry whose chosen component owns options in ``section`` (data: tasks; model: models)."""
    cls = SECTIONS[section]
    return cls._registry if issubclass(cls, _OwnsOptions) else None


__all__ = ["CHANGEABLE", "IDENTITY", "PER_START", "PRECISIONS", "SECTIONS", "DataConfig",
           "ModelConfig", "OptimConfig", "LoopConfig", "CheckpointConfig", "LogConfig", "option_for",
           "owner_section", "section_fields"]
