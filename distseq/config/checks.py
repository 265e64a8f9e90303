"""The one gate every configuration goes through, whatever its source (command line, config file, Python).

``validate`` checks each option by its declared facts (type, choices, bounds: ``distseq.options``),
then the chosen task's and model's own options the same way, then what only combinations can say
(a batch that does not divide, a tensor that would not fit in memory), then whatever the chosen task
and model check themselves (their ``validate(cfg)``). The first problem is a ``ConfigError`` naming
the option and what is allowed.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import List, Optional, Tuple

from distseq.config.sections import SECTIONS, _OwnsOptions, component_option_facts
from distseq.config.threshold import Threshold
from distseq.config.world import resolve_sharding
from distseq.errors import ConfigError
from distseq.options import MAX_POSITION, facts, flag_of
from distseq.registry import MODELS, TASKS

MAX_BLOCKS = 2**30  # blocks in one epoch of a finite --dataset-size
MAX_TENSOR_BYTES = 8 * 2**30  # one block, example, micro-batch or evaluation set of inputs

# accelerate's built-in trackers (utils.LoggerType) and what to install for each
_TRACKER_PACKAGES = {
    "tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "comet_ml": "comet-ml",
    "aim": "'aim<4'", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio",
}


def validate(cfg, world_size: int = 1):
    """Check every value of ``cfg`` (a ``TrainConfig``) for a launch of ``world_size`` processes; ``cfg`` itself, its
    values
    as the options hold them (a Path as str, an int as float where a number is asked for)."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError("WORLD_SIZE", f"the number of processes must be an integer >= 1 (got {world_size!r})")
    for name, cls in SECTIONS.items():
        section = getattr(cfg, name)
        if not isinstance(section, cls):
            raise ConfigError(name, f"must be a {cls.__name__} (got {section!r})")
        for fact in facts(cls):
            setattr(section, fact.name, fact.check(getattr(section, fact.name)))
    for name in ("data", "model"):
        section = getattr(cfg, name)
        section._registry.get(section.component())  # an unknown name lists the registered ones
        check_component_options(section)
    _check_combinations(cfg, world_size)
    # what only the chosen task and model know: each registered thing checks its own options
    for registered in (TASKS.get(cfg.data.task), MODELS.get(cfg.model.kind)):
        check = getattr(registered, "validate", None)
        if isinstance(registered, type) and not isinstance(inspect.getattr_static(registered, "validate", None),
                                                         (staticmethod, classmethod)):
            check = None  # an nn.Module's own validate(self, ...) method is not the config hook
        if check is not None:
            check(cfg)
    _check_sizes(cfg, world_size)
    d = cfg.data
    if d.data_files is not None:
        _check_data_files(cfg)
    else:
        for flag, given in (("--data-streaming", d.data_streaming), ("--eval-files", d.eval_files is not None),
                            ("--eval-share", d.eval_share is not None)):
            if given:
                raise ConfigError(flag, "applies to --data-files only; give --data-files or leave it out")
        _refuse_token_options(d, "give --task lm --data-files, or leave it out")
    if Path(cfg.train.run_dir).exists() and not Path(cfg.train.run_dir).is_dir():
        raise ConfigError("--run-dir", f"{cfg.train.run_dir} exists and is not a directory")
    return cfg


def check_component_options(section: _OwnsOptions) -> None:
    """The options set for the chosen task or model: each one it declares, each value (its defaults too) as
    its facts allow; then the options dataclass itself (its ``__post_init__`` may check combinations).

    An option the chosen component does not declare is refused, naming those that do, unless it holds the
    default every one of them gives it: then it changes nothing, and a config or command written for
    release 0.1 (whose config.json lists every model's and task's options) still runs."""
    registry, component = section._registry, section.component()
    owned = component_option_facts(registry)  # a plugin's option that takes a field's name is refused here too
    flag = "--task" if registry is TASKS else "--model"
    declared = {f.name: f for f in section.option_facts()}
    for name, value in list(section.options.items()):
        if name in declared:
            continue
        owners = owned[name][1] if name in owned else []
        defaults = {repr(next(f.default for f in facts(registry.options(owner)) if f.name == name)) for owner in owners}
        if owners and defaults == {repr(value)}:
            del section.options[name]  # the default of a model or task that is not this one: nothing to apply
            continue
        own = ", ".join(f.flag for f in declared.values()) or "none"
        raise ConfigError(flag_of(name), f"is not an option of {flag} {component} (its own options: {own}); "
                                         f"it belongs to {flag} {', '.join(owners) or 'no registered one'}")
    for name, value in section.own_options().items():
        try:
            checked = declared[name].check(value)
        except ConfigError as error:
            raise ConfigError(error.option, f"{error.message} [an option of {flag} {component}]") from None
        if name in section.options:
            section.options[name] = checked
    options_class = registry.options(component)
    if options_class is not None:
        options_class(**section.own_options())


def _check_combinations(cfg, world_size: int) -> None:
    d, t, c = cfg.data, cfg.train, cfg.checkpoint
    if d.min_seq_len is not None and d.min_seq_len > d.seq_len:
        raise ConfigError("--min-seq-len", f"{d.min_seq_len} is longer than --seq-len {d.seq_len}")
    if d.dataset_size is not None and d.dataset_size // d.block_size > MAX_BLOCKS:  # one permutation per epoch
        raise ConfigError("--dataset-size", f"{d.dataset_size} samples are more than {MAX_BLOCKS} blocks of "
                                            f"--block-size {d.block_size}; choose a larger --block-size")
    if t.compile_backend != "inductor" and not t.compile:
        raise ConfigError("--compile-backend", f"{t.compile_backend} applies under --compile; add --compile or "
                                               f"leave it out")
    if t.start_step >= t.max_steps:
        raise ConfigError("--start-step", f"must be below --max-steps {t.max_steps} (got {t.start_step})")
    if t.max_steps * t.global_batch_size > MAX_POSITION:
        raise ConfigError("--max-steps", f"--max-steps x --global-batch-size = {t.max_steps * t.global_batch_size} "
                                         f"samples; stream positions must stay below 2^62")
    if t.sharding == "none" and world_size > 1:
        raise ConfigError("--sharding", f"none trains on one process; this launch started {world_size} "
                                        f"(choose ddp, fsdp or auto)")
    if t.precision == "fp16" and resolve_sharding(t.sharding, world_size) == "fsdp":
        raise ConfigError("--precision", f"fp16 needs a gradient scaler that FSDP2's sharded gradients do not have "
                                         f"here; under --sharding {t.sharding}"
                                         f"{' (fsdp: an FSDP launch)' if t.sharding == 'auto' else ''} choose "
                                         f"--precision bf16, no or auto")
    if not c.resume:
        raise ConfigError("--resume", "expected auto, never or a checkpoint directory (got an empty string)")
    if c.resume not in ("auto", "never") and not Path(c.resume).is_dir():
        raise ConfigError("--resume", f"expected auto, never or a checkpoint directory (got {c.resume})")
    if c.overwrite and c.resume not in ("auto", "never"):
        raise ConfigError("--overwrite", "starts fresh; it cannot be combined with --resume PATH")
    if t.start_step and c.resume not in ("auto", "never"):
        raise ConfigError("--start-step", "applies to a fresh start; a checkpoint given to --resume sets the step")
    factor = cfg.log.straggler_factor
    if factor != 0 and not (math.isfinite(factor) and factor > 1.0):
        raise ConfigError("--straggler-factor", f"must be a finite number > 1, or 0 to never report a slow rank "
                                                f"(got {factor!r})")
    profile_range(cfg.log.profile_steps, t.max_steps)
    if cfg.log.tracker_timeout_s >= t.dist_timeout_s and cfg.trackers() not in ([], ["tensorboard"]):
        raise ConfigError("--tracker-timeout-s", f"must be below --dist-timeout-s {t.dist_timeout_s} (the other "
                                                 f"processes wait for the trackers' start) (got "
                                                 f"{cfg.log.tracker_timeout_s:g})")
    if t.stop_at is not None:
        Threshold.parse(t.stop_at, TASKS[cfg.data.task].head)
        if not t.eval_every:
            raise ConfigError("--stop-at", "is checked at evaluations; --eval-every 0 evaluates only at the end "
                                           "(set --eval-every N)")
    trackers(cfg.log.log_with)
    if not t.run_dir.strip():
        raise ConfigError("--run-dir", "must not be empty")
    per_step = world_size * t.grad_accum_steps
    if t.global_batch_size % per_step:
        raise ConfigError("--global-batch-size", f"{t.global_batch_size} is not divisible by processes x "
                                                 f"--grad-accum-steps = {world_size} x {t.grad_accum_steps} "
                                                 f"= {per_step}")


def _check_sizes(cfg, world_size: int) -> None:
    """No block, example, micro-batch or evaluation share of inputs (or a micro-batch's logits) past 8 GiB."""
    d = cfg.data
    task, spec = TASKS[d.task], cfg.task_spec()
    step_bytes = task.input_bytes(spec)
    micro = cfg.micro_batch_size(world_size)
    for flag, samples in (("--block-size", d.block_size), ("--samples-per-example", d.samples_per_example),
                          ("--eval-size", -(-d.eval_size // world_size)),  # each rank's share at once
                          ("--global-batch-size", micro)):
        size = samples * d.seq_len * step_bytes
        if size > MAX_TENSOR_BYTES:
            what = "int64 tokens" if task.tokens else f"{step_bytes // 4} features of float32"
            raise ConfigError(flag, f"{samples} samples x {d.seq_len} steps x {what} take {size / 2**30:.0f} GiB at "
                                    f"once (limit {MAX_TENSOR_BYTES // 2**30} GiB); choose a smaller value")
    if task.head == "per-step":  # float32 logits per step and output: a large vocabulary's dominate
        outputs = task.num_outputs(spec)
        logits = micro * d.seq_len * outputs * 4
        if logits > MAX_TENSOR_BYTES:
            raise ConfigError("--global-batch-size", f"one micro-batch's logits ({micro} samples x {d.seq_len} steps x "
                                                     f"{outputs} outputs of float32) take {logits / 2**30:.0f} GiB "
                                                     f"(limit {MAX_TENSOR_BYTES // 2**30} GiB); choose a smaller "
                                                     f"--global-batch-size (or more --grad-accum-steps), --seq-len or "
                                                     f"--vocab-size")


def _check_data_files(cfg) -> None:
    from distseq.data.files import check_files, resolve_files  # reads the first row: only when files are used

    d = cfg.data
    if d.data_cache is not None and not d.data_cache.strip():
        raise ConfigError("--data-cache", "is empty: give a directory, or leave it out for the default")
    streamed = "does not apply with --data-files --data-streaming; leave it out"
    conflicts = {  # option: (given, why not)
        "--dataset-size": (d.dataset_size is not None,
                           "does not apply with --data-files (the files' rows are the dataset); leave it out"),
        # streamed rows are read in-process so that their order and resume state stay exact, and they carry
        # no stream positions to verify
        "--num-workers": (d.data_streaming and d.num_workers != 0, streamed),
        "--verify-data": (d.data_streaming and cfg.train.verify_data, streamed),
    }
    for flag, (given, why_not) in conflicts.items():
        if given:
            raise ConfigError(flag, why_not)
    if d.eval_files is not None and d.eval_share is not None:
        raise ConfigError("--eval-share", "holds out part of --data-files; with --eval-files evaluation reads those: "
                                          "give one of them")
    if TASKS[d.task].language_model:
        _check_token_files(cfg)
        return
    _refuse_token_options(d, f"--task {d.task} reads rows")
    if d.eval_share is not None and d.data_streaming:
        raise ConfigError("--eval-share", streamed)
    check_files(resolve_files(d.data_files), d.sequence_column, d.label_column)
    if d.eval_files is not None:
        check_files(resolve_files(d.eval_files, "--eval-files"), d.sequence_column, d.label_column)


TOKEN_OPTIONS = ("tokenizer", "token_dtype", "eod_id", "packing")  # --task lm's options of --data-files


def _refuse_token_options(d, why: str) -> None:
    """The options of token files given where there are none: refused, never silently ignored."""
    defaults = {f.name: f.default for f in facts(type(d))}
    for name in TOKEN_OPTIONS:
        if getattr(d, name) != defaults[name]:
            raise ConfigError("--" + name.replace("_", "-"), f"applies to --task lm's --data-files; {why}")


DEFAULT_LM_SHARE = 0.05  # --task lm's held-out share when neither --eval-files nor --eval-share is given


def _check_token_files(cfg) -> None:
    """--task lm: token or text files (not both, in --eval-files alike), and what the files decide, set on ``cfg``
    so that config.json and every checkpoint record it: the codec of text (``--tokenizer``: ``bytes``, or the
    tokenizer.json's absolute path), its vocabulary (which --vocab-size left at its default becomes) and its
    end-of-document id, and the held-out share (--task lm's default without --eval-files). Options that apply to
    no file given are refused."""
    from distseq.data.files import resolve_files
    from distseq.data.text import BYTES, END_OF_TEXT, load_codec
    from distseq.data.tokens import check_token_files, token_format

    d = cfg.data
    files = resolve_files(d.data_files, tokens=True)
    text = check_token_files(files)
    every = files
    if d.eval_files is not None:
        evaluated = resolve_files(d.eval_files, "--eval-files", tokens=True)
        check_token_files(evaluated, "--eval-files", text=text)
        every = files + evaluated
    defaults = {f.name: f.default for f in facts(type(d))}
    formats = {token_format(f) for f in every}
    for option, applies, why in (
            ("--token-dtype", "bin" in formats, "is the id type of .bin files; none is given"),
            ("--sequence-column", formats & {"parquet", "json"}, "names the column of parquet or JSON-lines files; "
                                                                 "none is given"),
            ("--label-column", False, "--task lm's labels are the next tokens; leave it out")):
        name = option[2:].replace("-", "_")
        if not applies and getattr(d, name) != defaults[name]:
            raise ConfigError(option, why)
    if not text:
        if d.tokenizer is not None:
            raise ConfigError("--tokenizer", "reads text files (.txt); --data-files hold token ids already")
    else:
        codec = load_codec(d.tokenizer)
        d.tokenizer = BYTES if codec.name == BYTES else str(Path(d.tokenizer).absolute())
        if d.vocab_size == defaults["vocab_size"]:
            d.vocab_size = codec.vocab_size
        elif d.vocab_size != codec.vocab_size:
            raise ConfigError("--vocab-size", f"{d.vocab_size}, but the text's ids come from {codec.name}, "
                                              f"{codec.vocab_size} of them: give {codec.vocab_size} or leave it at "
                                              f"its default (a preset's or config file's value counts as given)")
        if codec.name == BYTES and d.eod_id not in (None, 0):
            raise ConfigError("--eod-id", f"byte-level text ends each document with byte 0 (got {d.eod_id}); "
                                          f"leave it out")
        if d.eod_id is None:
            if codec.eod_id is None:
                raise ConfigError("--eod-id", f"{d.tokenizer} has no end-of-text token (one of "
                                              f"{', '.join(END_OF_TEXT)}): give the id that ends a document")
            d.eod_id = codec.eod_id
    if d.eod_id is not None and d.eod_id >= d.vocab_size:
        raise ConfigError("--eod-id", f"{d.eod_id} is outside the vocabulary [0, {d.vocab_size}) (--vocab-size)")
    if d.eval_files is None and d.eval_share is None:
        d.eval_share = DEFAULT_LM_SHARE


def profile_range(text: Optional[str], max_steps: int) -> Optional[Tuple[int, int]]:
    """``--profile-steps A:B`` as (A, B), None when absent; ConfigError unless 0 <= A < B <= --max-steps."""
    if text is None:
        return None
    first, sep, last = str(text).partition(":")
    if not (sep and first.strip().isascii() and first.strip().isdecimal() and last.strip().isascii()
            and last.strip().isdecimal()):
        raise ConfigError("--profile-steps", f"expected A:B with integers 0 <= A < B <= --max-steps (got {text!r})")
    if not int(first) < int(last) <= max_steps:
        raise ConfigError("--profile-steps", f"expected 0 <= A < B <= --max-steps {max_steps} (got {text!r})")
    return int(first), int(last)


def trackers(text: str) -> List[str]:
    """``--log-with`` as a list of tracker names ([] for none); ConfigError unless each is a tracker
    accelerate knows (its ``LOGGER_TYPE_TO_CLASS``, custom registered ones included) and accelerate finds
    its package here: accelerate itself would drop a missing one without a word."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    names = list(dict.fromkeys(name.strip() for name in text.split(",")))  # in order, repeats once
    if names == ["none"]:
        return []
    known = sorted(LOGGER_TYPE_TO_CLASS)
    available = {str(t) for t in get_available_trackers()}
    for name in names:
        if name == "none":
            raise ConfigError("--log-with", f"none means no tracker; it cannot be combined with others (got {text!r})")
        if name not in known:
            what = f"an empty name in {text!r}" if not name else f"unknown tracker {name!r}"
            raise ConfigError("--log-with", f"{what} (choose from {', '.join(known)}, or none; comma-separated)")
        if name not in available and name in _TRACKER_PACKAGES:  # a custom registered tracker is always there
            raise ConfigError("--log-with", f"{name} is not installed: pip install {_TRACKER_PACKAGES[name]}")
    return names
