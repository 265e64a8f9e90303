"""``distseq`` command line. Options are generated from the config dataclasses (config.py)."""

from __future__ import annotations

if __name__ == "__main__":  # `python -m distseq.cli`; the `distseq` script starts in entry.py
    from distseq.entry import install

    install()  # before the heavy imports: a signal during start-up is one line, not a traceback

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

from .bench import SUITE_NAMES  # noqa: E402
from .config import PRESETS, SECTIONS, TrainConfig, apply_mapping, option_name, preset, read_config_file  # noqa: E402
from .errors import (EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, ConfigError, DistseqError,  # noqa: E402
                     StartupStopped, Stopped, TaskContractError)
from .io import check_output_dir, check_output_file, write_json  # noqa: E402
from .registry import MODELS, TASKS, import_plugins  # noqa: E402

_TYPES = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[str]": str}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), not a usage dump."""

    def error(self, message: str):
        _fail(f"{self.prog}: error: {message}")


def _fail(message: str, code: int = EXIT_USAGE, every_rank: bool = False):
    """One line on stderr and exit. Errors every rank meets alike are printed by rank 0 only."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for f in dataclasses.fields(cls):
            default = getattr(getattr(defaults, section), f.name)
            registry = {"task": TASKS, "model": MODELS}.get(f.metadata.get("registry"))
            choices = tuple(registry) if registry is not None else f.metadata.get("choices")
            common = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS)
            help_text = f.metadata["help"] + f" (default preset: {default})"
            if f.type in ("bool", "Optional[bool]"):
                group.add_argument(option_name(f), action=argparse.BooleanOptionalAction, help=help_text, **common)
            else:
                metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
                group.add_argument(option_name(f), type=_TYPES[f.type], metavar=metavar, help=help_text, **common)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distseq",
        description="Train sequence models on an exactly sharded synthetic stream, from one CPU to a cluster. "
        "Run under `accelerate launch` or `torchrun` for several processes; plain `distseq` runs one.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a model (start from a preset, override any field)",
        description="Train a model. Start from --preset and override any field; every value is checked "
        "before anything runs. Writes RUN/tensorboard/, RUN/checkpoints/step-N/, RUN/config.json and "
        "RUN/summary.json.",
    )
    train.add_argument(
        "--preset", default="default", metavar="{" + ",".join(PRESETS) + "}",
        help="starting configuration: 'default' (LSTM on the infinite sum-sign stream) or 'seed' (the original "
        "RNN example: 1,000 samples, batch 32, 10 epochs)",
    )
    train.add_argument(
        "--config", metavar="FILE",
        help="YAML or JSON file with the sections of `--print-config` (data, model, optim, train, checkpoint, log); "
        "applied over --preset, and command-line options override it",
    )
    train.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    train.add_argument("--index-only", action="store_true",
                       help="build (or check) the index of --data-files and exit, writing nothing of the run: e.g. "
                       "once per node before a large job, so its processes do not wait for it at start-up")
    _add_config_options(train)

    bench = commands.add_parser(
        "bench",
        help="measure distseq against raw references on this machine (ratios in one run)",
        description="Run benchmark suites, each in a process of its own, and write OUT/bench.json, one JSON per "
        "suite, PNG plots (with the optional matplotlib extra: pip install -e '.[bench]') and OUT/report.md. "
        "Every figure is a ratio against a reference measured in the same run: overhead (distseq train vs a "
        "plain PyTorch loop), scaling (2 CPU processes vs 1), stream (the data pipeline vs raw torch.randn), "
        "files (indexed --data-files vs raw pyarrow), "
        "accuracy (time to 0.99 vs the original example's recipe), precision (probe of every model kind), "
        "profile (where a step's time goes), recall (induction heads and MQAR: attention vs an LSTM), "
        "startup (seconds from launch to the first optimizer step on 1, 2, 4 and 8 processes, by phase: a figure, "
        "not a ratio). The full run takes about 22 minutes on 2 cores, 13 of them recall.",
    )
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help="suites to run, from: " + ", ".join(SUITE_NAMES) + " (default: all)")
    bench.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    bench.add_argument("--quick", action="store_true",
                       help="short measurements (about 2 minutes in all): checks the suites run, not for comparison")

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on held-out data; writes RUN/eval.json",
        description="Evaluate the newest intact checkpoint of --run-dir (or --checkpoint) on the held-out stream "
        "of its task, or on --data-files. Runs on 1 or N processes (every sample counted once).",
    )
    evaluate.add_argument("--run-dir", required=True, help="the run directory (eval.json is written there)")
    evaluate.add_argument("--checkpoint", help="a checkpoint directory (default: the newest intact one)")
    evaluate.add_argument("--eval-size", type=int, help="held-out samples (default: the run's --eval-size)")
    evaluate.add_argument("--data-files", help="evaluate on these parquet/jsonl files instead (the run's columns)")
    evaluate.add_argument("--output", metavar="FILE", help="write the result here (default: RUN/eval.json)")

    predict = commands.add_parser(
        "predict", help="predictions of a checkpoint as JSON lines",
        description="One JSON line per input: probability and class (binary tasks), value (adding), or the "
        "class of every step (copy). Every input line is checked before anything is written.",
    )
    predict.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", metavar="FILE.jsonl", help="JSON lines with a sequence each")
    source.add_argument("--random", type=int, metavar="N", help="predict the first N held-out samples (with labels)")
    predict.add_argument("--sequence-column", default="sequence", help="field of each input line (default: sequence)")
    predict.add_argument("--output", help="write here (atomically) instead of stdout")

    export = commands.add_parser(
        "export", help="export a checkpoint for inference (model.safetensors + config.json)",
        description="Write model.safetensors and config.json; distseq.load_model(DIR) rebuilds the model "
        "without the trainer or accelerate.",
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    export.add_argument("--out", required=True, help="output directory")

    probe = commands.add_parser(
        "probe", help="which model x precision runs on this device, and how fast",
        description="One forward+backward per model kind x precision on this device (the GPU of LOCAL_RANK, "
        "else the CPU), at --seq-len, --hidden-size and --global-batch-size: works or the error, and ms per step.",
    )
    probe.add_argument("--preset", default="default", help="configuration to start from (default: default)")
    for option, kind, default in (("--seq-len", int, None), ("--hidden-size", int, None),
                                  ("--global-batch-size", int, None)):
        probe.add_argument(option, type=kind, default=default, help="override the preset's value")
    probe.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")
    commands.add_parser(
        "launch", add_help=False,
        help="launch train or eval on N processes with accelerate's launcher: the ranks' exit codes relayed "
        "(143 preempted, 130 interrupted, 2 bad input, 1 failure), reliable in-job restarts (--max_restarts); "
        "`distseq launch --help` for more",
    )
    check = commands.add_parser(
        "check-task", help="prove a task keeps the stream contract (built-in or a plugin's)",
        description="Check that a registered task is a pure, vectorised, seekable function of (seed, block, "
        "position): the same samples for the same indices across calls and processes, any position reachable "
        "in O(1), each global batch the same on 1, 2 and 3 ranks, labels consistent with inputs (where the task "
        "can recompute them), dtypes and shapes as its head declares. One line per property; a failure names "
        "the property and the index, exit 1.",
    )
    check.add_argument("task", metavar="TASK", help="a registered task name (--import a plugin for your own)")
    for option, kind in (("--seq-len", int), ("--min-seq-len", int), ("--vocab-size", int), ("--copy-len", int),
                         ("--num-kv-pairs", int), ("--block-size", int), ("--seed", int)):
        check.add_argument(option, type=kind, help="override the value of the preset named after the task (mqar, "
                                                   "induction, selective-copy), else of the default configuration")
    for sub in commands.choices.values():
        _add_import_option(sub)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--preset, then --config FILE, then the command-line options, in that order of precedence."""
    cfg = preset(args.preset)
    if args.config:
        apply_mapping(cfg, read_config_file(args.config), args.config)
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return cfg


def _imports_in(argv: List[str]) -> List[str]:
    """The --import values anywhere in ``argv``: plugins must register before the parser lists names."""
    specs = []
    for i, arg in enumerate(argv):
        if arg == "--import" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--import="):
            specs.append(arg.split("=", 1)[1])
    return specs


def _add_import_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import a plugin first (a module name or a .py file) that registers tasks or models "
                        "with distseq.register_task / register_model; repeatable. Modules of the 'distseq.plugins' "
                        "entry-point group are imported too")


def main(argv: Optional[List[str]] = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        import_plugins(_imports_in(argv))
    except ConfigError as error:
        command = next((a for a in argv if not a.startswith("-")), "")
        _fail(f"distseq {command}: error: {error}".replace("  ", " "))
    if argv and argv[0] == "launch":  # accelerate's own options follow, parsed by accelerate's parser
        args = argparse.Namespace(command="launch", launch_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except DistseqError as error:
        if isinstance(error, Stopped) and error.step is not None:
            return error.exit_code  # saved, and the line saying so was printed
        _fail(f"distseq {args.command}: error: {error}", code=error.exit_code, every_rank=error.every_rank)
    except StartupStopped as stop:
        _fail(f"distseq {args.command}: {stop}", code=stop.exit_code)
    except KeyboardInterrupt:  # a SIGINT before the run's own handling began (imports, argument checks)
        _fail(f"distseq {args.command}: interrupted (SIGINT); nothing was saved", code=EXIT_INTERRUPTED)
    except MemoryError:
        _fail(f"distseq {args.command}: error: out of memory; choose smaller sizes (--hidden-size, "
              f"--global-batch-size, --eval-size, --block-size)", code=EXIT_FAILURE, every_rank=True)
    except OSError as error:  # a file the checks above could not foresee (a disk filling up mid-run, ...)
        where = f"{error.filename}: " if error.filename else ""
        _fail(f"distseq {args.command}: error: {where}{error.strerror or error}", code=EXIT_FAILURE, every_rank=True)
    except RuntimeError as error:
        from .runtime import is_collective_failure

        if _is_out_of_memory(error):
            _fail(f"distseq {args.command}: error: out of memory ({str(error).splitlines()[0][:200]}); choose "
                  f"smaller sizes (--hidden-size, --global-batch-size, --eval-size)", code=EXIT_FAILURE, every_rank=True)
        if not is_collective_failure(error):
            raise
        # a peer died or a collective timed out (--dist-timeout-s): say so in one line instead of hanging
        _fail(f"distseq {args.command}: error: lost contact with another process: {str(error).splitlines()[0][:300]}",
              code=EXIT_FAILURE, every_rank=True)
    return 0


def _is_out_of_memory(error: RuntimeError) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def _run(args: argparse.Namespace) -> int:
    """One subcommand; every output path is checked before any work starts."""
    return COMMANDS[args.command](args) or 0


def _train(args: argparse.Namespace) -> None:
    from .loop import open_files, train

    cfg = config_from_args(args)
    if args.print_config or args.index_only:
        cfg.validate(int(os.environ.get("WORLD_SIZE", "1")))
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    if args.index_only:
        if not cfg.data.data_files or cfg.data.data_streaming:
            raise ConfigError("--index-only", "needs --data-files (indexed, not --data-streaming)")
        index = open_files(cfg)
        print(f"distseq: index of {len(index.files)} file(s) ready: {index.rows} rows, sha256 "
              f"{index.identity()['sha256'][:12]}", flush=True)
        return
    train(cfg)


def _eval(args: argparse.Namespace) -> None:
    from .evaluation import eval_command

    if args.eval_size is not None:
        _positive("--eval-size", args.eval_size)
    output = check_output_file("--output", args.output or Path(args.run_dir) / "eval.json")
    eval_command(args.run_dir, args.checkpoint, args.eval_size, args.data_files, output)


def _predict(args: argparse.Namespace) -> None:
    from .export import model_from_checkpoint
    from .predict import predictions, random_inputs, read_inputs, write_lines

    if args.random is not None:
        _positive("--random", args.random, high=MAX_PREDICT)
    if args.output is not None:
        check_output_file("--output", args.output)
    model, cfg, _ = model_from_checkpoint(Path(args.checkpoint))
    if args.random is not None:
        x, lengths, labels = random_inputs(args.random, cfg)
    else:
        (x, lengths), labels = read_inputs(args.input, args.sequence_column, cfg), None
    write_lines(predictions(model, x, lengths, cfg, labels), args.output)


def _export(args: argparse.Namespace) -> None:
    from .export import export

    check_output_dir("--out", args.out)
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ConfigError("--out", "must differ from --checkpoint (the export would overwrite the checkpoint's files)")
    print(f"distseq: exported to {export(Path(args.checkpoint), Path(args.out))}")


def _probe(args: argparse.Namespace) -> None:
    from .precision import format_probe, probe_table
    from .runtime import local_device

    cfg = preset(args.preset)
    for name, section in (("seq_len", cfg.data), ("hidden_size", cfg.model), ("global_batch_size", cfg.train)):
        if getattr(args, name) is not None:
            setattr(section, name, getattr(args, name))
    cfg.validate()
    if args.json is not None:
        check_output_file("--json", args.json)
    rows = probe_table(cfg, local_device())
    print(format_probe(rows, local_device()))
    if args.json:
        write_json(Path(args.json), rows)


def _check_task(args: argparse.Namespace) -> None:
    from .checktask import check_task, format_findings

    cfg = preset(args.task) if args.task in PRESETS else TrainConfig()  # a token task's preset has its shape
    cfg.data.task = args.task
    for name in ("seq_len", "min_seq_len", "vocab_size", "copy_len", "num_kv_pairs", "block_size"):
        if getattr(args, name) is not None:
            setattr(cfg.data, name, getattr(args, name))
    if args.seed is not None:
        cfg.train.seed = args.seed
    cfg.validate()
    findings = check_task(cfg, args.imports)
    print(format_findings(args.task, findings))
    failed = [f for f in findings if not f.ok]
    if failed:
        raise TaskContractError(f"task {args.task!r} breaks the stream contract: {failed[0].name}: {failed[0].detail}")


def _bench(args: argparse.Namespace) -> None:
    from .bench import run_bench

    unknown = [name for name in args.suites if name not in SUITE_NAMES]
    if unknown:
        raise ConfigError("SUITE", f"unknown suite {unknown[0]!r} (choose from {', '.join(SUITE_NAMES)})")
    check_output_dir("--out", args.out)
    run_bench(args.out, args.suites or SUITE_NAMES, args.quick)


def _launch(args: argparse.Namespace) -> int:
    from .launch import launch

    def check_train(options: List[str], world: int) -> None:  # as every rank will read them
        config_from_args(build_parser().parse_args(["train", *options])).validate(world)

    return launch(args.launch_args, check_train)


COMMANDS = {"train": _train, "launch": _launch, "eval": _eval, "predict": _predict, "export": _export, "probe": _probe,
            "check-task": _check_task, "bench": _bench}


MAX_PREDICT = 10**7  # --random N: held-out samples generated at once


def _positive(option: str, value: int, high: int = 2**62) -> None:
    if not 1 <= value <= high:
        raise ConfigError(option, f"must be an integer >= 1" + (f" and <= {high}" if value > high else "")
                          + f" (got {value})")


if __name__ == "__main__":
    from distseq.entry import run

    sys.exit(run(main))
