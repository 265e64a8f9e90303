"""The ``distseq`` parser, its options generated from each option's declared facts.

Every ``--field`` of ``train`` (and the few that ``probe`` and ``check-task`` take) is built from the
field's facts (``distseq.options``): its type, its choices or registry, its help; the options that
registered tasks and models declare for themselves are added the same way, each flag once with the
names of the tasks or models it applies to. So the help, the parser, config files and validation
cannot drift apart, and a plugin's option (``--import`` first) is a flag like any other.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, Iterable, List, Sequence, Tuple

from distseq.bench import BACKENDS, ON_REQUEST, SUITE_NAMES
from distseq.config import PRESETS, SECTIONS, TrainConfig
from distseq.config.sections import component_option_facts, owner_section
from distseq.errors import EXIT_USAGE
from distseq.options import Fact, facts
from distseq.registry import MODELS, TASKS

ARG_TYPES = {int: int, float: float, str: str}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), not a usage dump."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USAGE)


def add_option(group, fact: Fact, dest: str, note: str = "") -> None:
    """One command-line option from a field's facts; absent from the namespace unless given."""
    common = dict(dest=dest, default=argparse.SUPPRESS, help=fact.help + note)
    if fact.kind is bool:
        group.add_argument(fact.flag, action=argparse.BooleanOptionalAction, **common)
        return
    registry = {"task": TASKS, "model": MODELS}.get(fact.registry)
    choices = tuple(registry) if registry is not None else fact.choices
    metavar = "{" + ",".join(map(str, choices)) + "}" if choices else fact.name.upper()
    group.add_argument(fact.flag, type=ARG_TYPES[fact.kind], metavar=metavar, **common)


def add_fields(parser, names: Iterable[str], note: str = "") -> None:
    """The options ``"section.name"`` of the config, as ``train`` spells them."""
    for key in names:
        section, name = key.split(".")
        fact = next(f for f in facts(SECTIONS[section]) if f.name == name)
        add_option(parser, fact, key, note)


def add_component_options(parser, section: str, group=None) -> None:
    """The options the registered tasks (section "data") or models ("model") declare, each flag once."""
    chooser = "task" if section == "data" else "model"
    for name, (fact, owners) in component_option_facts(owner_section(section)).items():
        defaults = {owner: _default(section, owner, name) for owner in owners}
        shown = (f"default {next(iter(defaults.values()))}" if len(set(map(repr, defaults.values()))) == 1 else
                 "defaults " + ", ".join(f"{owner} {value}" for owner, value in defaults.items()))
        add_option(group or parser, fact, f"{section}.{name}", f" (--{chooser} {', '.join(owners)}; {shown})")


def _default(section: str, owner: str, name: str):
    declared = owner_section(section).options(owner)
    return next(f.default for f in facts(declared) if f.name == name)


def add_train_options(parser) -> None:
    defaults = TrainConfig()
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        for fact in facts(cls):
            add_option(group, fact, f"{section}.{fact.name}",
                       f" (default preset: {getattr(getattr(defaults, section), fact.name)})")
        if owner_section(section) is not None:
            kind = "task" if section == "data" else "model"
            add_component_options(parser, section, parser.add_argument_group(
                f"the {kind}s' own options (each applies to the {kind}s named; --import a plugin to list its own)"))


def overrides(args: argparse.Namespace) -> Dict[str, object]:
    """``{"section.name": value}`` of the config options given on the command line."""
    return {key: value for key, value in vars(args).items() if "." in key}


def imports_in(argv: Sequence[str]) -> List[str]:
    """The --import values anywhere in ``argv``: plugins must register before the parser lists names."""
    specs = []
    for i, arg in enumerate(argv):
        if arg == "--import" and i + 1 < len(argv):
            specs.append(argv[i + 1])
        elif arg.startswith("--import="):
            specs.append(arg.split("=", 1)[1])
    return specs


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="distseq",
        description="Train sequence models on an exactly sharded synthetic stream, from one CPU to a cluster. "
        "Run under `distseq launch`, `accelerate launch` or `torchrun` for several processes; plain `distseq` runs "
        "one.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for add in (add_train, add_sweep, add_bench, add_eval, add_predict, add_generate, add_export, add_probe,
                add_launch, add_check_task):
        add(commands)
    for sub in commands.choices.values():
        sub.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                         help="import a plugin first (a module name or a .py file) that registers tasks or models "
                         "with distseq.register_task / register_model; repeatable. Modules of the "
                         "'distseq.plugins' entry-point group are imported too")
    return parser


def add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a model (start from a preset, override any field)",
        description="Train a model. Start from --preset and override any field; every value is checked "
        "before anything runs. Writes RUN/tensorboard/, RUN/checkpoints/step-N/, RUN/config.json and "
        "RUN/summary.json. A task's or model's own options apply when it is chosen; a preset's own ones "
        "belong to the preset's task and model.",
    )
    train.add_argument(
        "--preset", default="default", metavar="{" + ",".join(PRESETS) + "}",
        help="starting configuration: 'default' (LSTM on the infinite sum-sign stream), 'seed' (the original "
        "RNN example: 1,000 samples, batch 32, 10 epochs), or a token task's decoder (mqar, induction, "
        "selective-copy)",
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
    add_train_options(train)


def add_sweep(commands) -> None:
    sweep = commands.add_parser(
        "sweep", help="run a grid of runs (a sweep file): resumable, in a pool or a SLURM array, ending in a report",
        description="Run every point of a sweep file (YAML: a base, a grid and/or a list of points; see the README's "
        "Sweeps section), each an ordinary run dir under the sweep dir. Rerunning leaves complete points untouched, "
        "resumes interrupted ones and starts the rest; a spec may only add points. `distseq sweep report SWEEP_DIR` "
        "builds SWEEP_DIR/report/ (results.csv/json, tables, plots, report.md) from the files alone, at any time.",
    )
    sweep.add_argument("spec", metavar="SPEC", help="the sweep file; or the word report, then SWEEP_DIR")
    sweep.add_argument("report_dir", nargs="?", metavar="SWEEP_DIR", help="after report: the sweep dir to report on")
    sweep.add_argument("--dir", dest="sweep_dir", metavar="DIR",
                       help="the sweep dir (default runs/sweeps/<the spec file's name>)")
    sweep.add_argument("--dry-run", action="store_true", help="list the points, their state and command; run nothing")
    sweep.add_argument("--retry-failed", action="store_true", help="run the failed points again (else left failed)")
    sweep.add_argument("--pool", type=int, metavar="N", help="points at once on this machine (default: the sweep "
                       "file's pool, else the cores / (processes x threads))")
    from distseq.sweep.report import add_arguments

    add_arguments(sweep.add_argument_group("report options (distseq sweep report SWEEP_DIR)"), with_dir=False)


def add_bench(commands) -> None:
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
        "checkpoint (blocked seconds per save, sync vs async), "
        "startup (seconds from launch to the first optimizer step on 1, 2, 4 and 8 processes, by phase: a figure, "
        "not a ratio), sweep (what distseq sweep adds per point), mixers (tokens/s of each sequence mixer against "
        "attention at seq 256 and 2,048, and activation memory), speed (--compile against eager distseq train and a "
        "plain loop on the decoder and the LSTM, and --activation-checkpointing's memory cut and tokens/s cost at seq "
        "2,048). On request only: zoology (Zoology's MQAR figure: "
        "six models x widths x cells x learning rates as a resumable sweep under OUT/zoology-sweep; about an hour "
        "on 2 cores). The default run takes about 25 minutes on 2 cores.",
    )
    bench.add_argument("suites", nargs="*", metavar="SUITE",
                       help="suites to run, from: " + ", ".join(SUITE_NAMES + ON_REQUEST)
                       + " (default: all but " + ", ".join(ON_REQUEST) + ")")
    bench.add_argument("--out", default="bench-out", help="output directory (default: bench-out)")
    bench.add_argument("--quick", action="store_true",
                       help="short measurements (about 3 minutes in all): checks the suites run, not for comparison")
    bench.add_argument("--backend", choices=BACKENDS, default="local",
                       help="where the zoology suite's sweep runs: local processes, or a SLURM job array (run the "
                            "same command again when the array has ended: it builds the table from the run dirs)")


def add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint on held-out data; writes RUN/eval.json",
        description="Evaluate the newest intact checkpoint of --run-dir (or --checkpoint) on the held-out stream "
        "of its task, or on --data-files. Runs on 1 or N processes (every sample counted once).",
    )
    evaluate.add_argument("--run-dir", required=True, help="the run directory (eval.json is written there)")
    evaluate.add_argument("--checkpoint", help="a checkpoint directory (default: the newest intact one)")
    evaluate.add_argument("--eval-size", type=int, help="held-out samples (default: the run's --eval-size)")
    evaluate.add_argument("--data-files", help="evaluate on these files instead, every sample once in order (the kind "
                                               "the run read: rows with its columns, or its token files or text)")
    evaluate.add_argument("--output", metavar="FILE", help="write the result here (default: RUN/eval.json)")


def add_predict(commands) -> None:
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


def add_generate(commands) -> None:
    generate = commands.add_parser(
        "generate", help="text or token ids written by a causal model of a checkpoint after a prompt",
        description="Continue a prompt with a checkpoint's causal model (the decoder, the mixers, one-directional "
        "rnn, gru, lstm) trained on a token task: greedy (--temperature 0) or sampled (--temperature, --top-k, "
        "--seed). A run on text (.txt --data-files, bytes or --tokenizer) writes text: the prompt, then what the "
        "model wrote. A run on token ids writes one JSON line {\"prompt\": [...], \"generated\": [...], "
        "\"ended\": \"eod\" or \"max-new-tokens\"}. The model reads the last --seq-len tokens of its run (a longer "
        "prompt is refused); the "
        "decoder and sliding-window keep a cache of keys and values, so each new token costs one position.",
    )
    generate.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt as text (a run on text only), encoded as its "
                        "data were")
    source.add_argument("--prompt-ids", metavar="IDS", help="the prompt as token ids, e.g. 1,2,3 (any run)")
    source.add_argument("--prompt-file", metavar="FILE", help="the prompt read from FILE exactly as it is: text for "
                        "a run on text, ids as --prompt-ids otherwise")
    generate.add_argument("--max-new-tokens", type=int, default=100, metavar="N",
                          help="tokens to write at most (default: 100)")
    generate.add_argument("--temperature", type=float, default=1.0, metavar="T",
                          help="0 = greedy (the most likely token); else draw from softmax(logits / T): below 1 "
                          "sharper, above 1 flatter (default: 1.0)")
    generate.add_argument("--top-k", type=int, metavar="K",
                          help="draw among the K most likely tokens only (default: all; 1 = greedy)")
    generate.add_argument("--seed", type=int, default=0,
                          help="seed of the draws: the same seed gives the same output (default: 0)")
    generate.add_argument("--ignore-eod", action="store_true",
                          help="go on past the run's end-of-document id (default: stop there; it is not written)")
    generate.add_argument("--no-cache", action="store_true",
                          help="recompute the whole context for every token instead of keeping past keys and "
                          "values (the same tokens, slower; a check of the cache)")
    generate.add_argument("--output", metavar="FILE", help="write here (atomically) instead of stdout")


def add_export(commands) -> None:
    export = commands.add_parser(
        "export", help="export a checkpoint for inference (model.safetensors + config.json)",
        description="Write model.safetensors and config.json; distseq.load_model(DIR) rebuilds the model "
        "without the trainer or accelerate.",
    )
    export.add_argument("--checkpoint", required=True, help="a checkpoint directory")
    export.add_argument("--out", required=True, help="output directory")


def add_probe(commands) -> None:
    probe = commands.add_parser(
        "probe", help="which model x precision runs on this device, and how fast",
        description="One forward+backward per model kind x precision on this device (the GPU of LOCAL_RANK, "
        "else the CPU), at --seq-len, --hidden-size and --global-batch-size: works or the error, and ms per step.",
    )
    probe.add_argument("--preset", default="default", metavar="{" + ",".join(PRESETS) + "}",
                       help="configuration to start from (default: default)")
    add_fields(probe, PROBE_FIELDS, " (default: the preset's)")
    probe.add_argument("--json", metavar="FILE", help="also write the table as JSON to FILE")


def add_launch(commands) -> None:
    commands.add_parser(
        "launch", add_help=False,
        help="launch train or eval on N processes with accelerate's launcher: the ranks' exit codes relayed "
        "(143 preempted, 130 interrupted, 2 bad input, 1 failure), reliable in-job restarts (--max_restarts); "
        "`distseq launch --help` for more",
    )


def add_check_task(commands) -> None:
    check = commands.add_parser(
        "check-task", help="prove a task keeps the stream contract (built-in or a plugin's)",
        description="Check that a registered task is a pure, vectorised, seekable function of (seed, block, "
        "position): the same samples for the same indices across calls and processes, any position reachable "
        "in O(1), each global batch the same on 1, 2 and 3 ranks, labels consistent with inputs (where the task "
        "can recompute them), dtypes and shapes as its head declares. One line per property; a failure names "
        "the property and the index, exit 1. Shapes start from the preset named after the task (mqar, "
        "induction, selective-copy), else the default configuration.",
    )
    check.add_argument("task", metavar="TASK", help="a registered task name (--import a plugin for your own)")
    add_fields(check, CHECK_TASK_FIELDS)
    add_component_options(check, "data")


PROBE_FIELDS: Tuple[str, ...] = ("data.seq_len", "model.hidden_size", "train.global_batch_size")
CHECK_TASK_FIELDS: Tuple[str, ...] = ("data.seq_len", "data.min_seq_len", "data.vocab_size", "data.block_size",
                                      "train.seed")
