"""The ``distseq`` commands, one function each: its arguments in, its work done, nothing printed on
failure (the command line's entry turns errors into one line and an exit code). Every output path is
checked before any work starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import List

from distseq.bench import ON_REQUEST, SUITE_NAMES
from distseq.cli.parser import build_parser, overrides
from distseq.config import PRESETS, TrainConfig, from_sources, read_config_file
from distseq.config.world import launch_world_size
from distseq.errors import ConfigError, TaskContractError
from distseq.fsio import check_output_dir, check_output_file, write_json
from distseq.ops.signals import watch_unheard

MAX_PREDICT = 10**7  # --random N: held-out samples generated at once


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """--preset, then --config FILE, then the command-line options, in that order of precedence."""
    mapping = read_config_file(args.config) if args.config else {}
    return from_sources(args.preset, mapping, args.config or "", overrides(args))


def train(args: argparse.Namespace) -> None:
    from distseq.training.datasets import open_files
    from distseq.training.loop import train

    watch_unheard()  # a rank blocked inside torch (a peer that never comes) still obeys a stop signal

    cfg = config_from_args(args)
    if args.print_config or args.index_only:
        cfg.validate(launch_world_size())
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return
    if args.index_only:
        if not cfg.data.data_files or cfg.data.data_streaming:
            raise ConfigError("--index-only", "needs --data-files (indexed, not --data-streaming)")
        index = open_files(cfg)
        print(f"distseq: index of {len(index.files)} file(s) ready: {index.describe()}, sha256 "
              f"{index.identity()['sha256'][:12]}", flush=True)
        return
    train(cfg)


def evaluate(args: argparse.Namespace) -> None:
    from distseq.inference.evaluate import eval_command

    watch_unheard()

    if args.eval_size is not None:
        positive("--eval-size", args.eval_size)
    output = check_output_file("--output", args.output or Path(args.run_dir) / "eval.json")
    eval_command(args.run_dir, args.checkpoint, args.eval_size, args.data_files, output)


def predict(args: argparse.Namespace) -> None:
    from distseq.inference.export import model_from_checkpoint
    from distseq.inference.predict import predictions, random_inputs, read_inputs, write_lines

    if args.random is not None:
        positive("--random", args.random, high=MAX_PREDICT)
    if args.output is not None:
        check_output_file("--output", args.output)
    model, cfg, _ = model_from_checkpoint(Path(args.checkpoint))
    if args.random is not None:
        x, lengths, labels = random_inputs(args.random, cfg)
    else:
        (x, lengths), labels = read_inputs(args.input, args.sequence_column, cfg), None
    write_lines(predictions(model, x, lengths, cfg, labels), args.output)


def generate(args: argparse.Namespace) -> None:
    from distseq.inference.generate import MAX_NEW_TOKENS, Sampling, generate_command

    positive("--max-new-tokens", args.max_new_tokens, high=MAX_NEW_TOKENS)
    sampling = Sampling(args.temperature, args.top_k, args.seed).check()
    if args.output is not None:
        check_output_file("--output", args.output)
    prompt = next((option, value) for option, value in (("--prompt", args.prompt), ("--prompt-ids", args.prompt_ids),
                                                         ("--prompt-file", args.prompt_file)) if value is not None)
    generate_command(args.checkpoint, prompt, args.max_new_tokens, sampling, not args.no_cache, not args.ignore_eod,
                     args.output)


def export(args: argparse.Namespace) -> None:
    from distseq.inference.export import export

    check_output_dir("--out", args.out)
    if Path(args.out).resolve() == Path(args.checkpoint).resolve():
        raise ConfigError("--out", "must differ from --checkpoint (the export would overwrite the checkpoint's files)")
    print(f"distseq: exported to {export(Path(args.checkpoint), Path(args.out))}")


def probe(args: argparse.Namespace) -> None:
    from distseq.distributed.accelerator import local_device
    from distseq.training.precision import format_probe, probe_table

    cfg = from_sources(args.preset, overrides=overrides(args))
    cfg.validate()
    if args.json is not None:
        check_output_file("--json", args.json)
    rows = probe_table(cfg, local_device())
    print(format_probe(rows, local_device()))
    if args.json:
        write_json(Path(args.json), rows)


def check_task(args: argparse.Namespace) -> None:
    from distseq.data.contract import check_task, format_findings
    from distseq.registry import TASKS

    if args.task in TASKS and TASKS[args.task].language_model:
        raise ConfigError("TASK", f"{args.task}'s samples are windows of your --data-files, not drawn by the task: "
                                  f"check-task proves the contract of a task that draws its own")
    # a token task's preset has its shape; any other task starts from the default configuration
    cfg = from_sources(args.task if args.task in PRESETS else "default",
                       overrides={"data.task": args.task, **overrides(args)})
    cfg.validate()
    findings = check_task(cfg, args.imports)
    print(format_findings(args.task, findings))
    failed = [f for f in findings if not f.ok]
    if failed:
        raise TaskContractError(f"task {args.task!r} breaks the stream contract: {failed[0].name}: {failed[0].detail}")


def sweep(args: argparse.Namespace) -> int:
    from distseq.sweep.report import REPORT_OPTIONS, report_command

    if args.spec == "report":
        if not args.report_dir:
            raise ConfigError("SWEEP_DIR", "distseq sweep report needs the sweep dir to report on")
        args.sweep_dir = args.report_dir
        return report_command(args)
    given = [name for name in REPORT_OPTIONS if getattr(args, name) not in (None, "eval/accuracy", "best")]
    if given:
        raise ConfigError(f"--{given[0]}", "applies to distseq sweep report SWEEP_DIR (a sweep ends with the default "
                                           "report)")
    if args.report_dir:
        raise ConfigError("SPEC", f"one sweep file is run at a time (got {args.spec} and {args.report_dir})")
    if args.pool is not None:
        positive("--pool", args.pool)
    from distseq.sweep.runner import run_sweep

    return run_sweep(args.spec, args.sweep_dir, args.dry_run, args.retry_failed, args.pool)


def bench(args: argparse.Namespace) -> None:
    from distseq.bench import run_bench

    known = SUITE_NAMES + ON_REQUEST
    unknown = [name for name in args.suites if name not in known]
    if unknown:
        raise ConfigError("SUITE", f"unknown suite {unknown[0]!r} (choose from {', '.join(known)})")
    check_output_dir("--out", args.out)
    run_bench(args.out, args.suites or SUITE_NAMES, args.quick, backend=args.backend)


def launch(args: argparse.Namespace) -> int:
    from distseq.ops.launch import launch

    def check_train(options: List[str], world: int) -> None:  # as every rank will read them
        config_from_args(build_parser().parse_args(["train", *options])).validate(world)

    return launch(args.launch_args, check_train)





MAX_PREDICT = 10**7  # --random N: held-out samples generated at once


def positive(option: str, value: int, high: int = 2**62) -> None:
    if not 1 <= value <= high:
        raise ConfigError(option, "must be an integer >= 1" + (f" and <= {high}" if value > high else "")
                          + f" (got {value})")


COMMANDS = {"train": train, "launch": launch, "eval": evaluate, "predict": predict, "generate": generate,
            "export": export, "probe": probe, "check-task": check_task, "bench": bench, "sweep": sweep}
