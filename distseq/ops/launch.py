"""``distseq launch [ACCELERATE LAUNCH OPTIONS] train|eval [OPTIONS]``: accelerate's launcher, ending like distseq.

``accelerate launch`` (and ``torchrun``) end a failed or stopped job with a launcher traceback and
exit 1, whatever the ranks said: a preemption that saved (143), a bad option (2) and a crash all
look alike to a scheduler. This command takes accelerate's own options and config files, runs the
same launchers in-process, and then:

- **relays the ranks' exit code**: 2 (bad input), 130 (interrupted), 143 (preempted) as the first
  failed rank ended, 1 for any other failure (a crash, a rank killed by a signal); the ranks have
  printed their one line, the launcher adds one naming the rank, never a traceback;
- **stops on a signal like the ranks do**: SIGTERM, SIGINT, SIGHUP and SIGUSR1 to the launcher reach every
  rank (they save at the next step boundary), the launcher waits up to ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``
  seconds (default here 300: long enough to save) and exits 143, or 130 for SIGINT;
- **makes in-job restarts reliable on any number of machines** (``--max_restarts N``): torch's static
  rendezvous keeps one store for every attempt; distseq's ranks write each attempt's keys under a prefix
  of their own, named by torch's restart count, which agrees within a machine but not always across
  machines. So with restarts the launch uses the c10d rendezvous with a fresh store per attempt
  (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``), which needs no count. A crashed rank then restarts the
  whole group, which resumes from the newest complete checkpoint. torch
  restarts after any failed rank: one that was signalled directly (not through the launcher) resumes
  training, and a bad input fails N+1 times before its exit 2 is relayed;
- **checks the options first**: ``train``'s options are validated for the launch's world size before
  any rank starts, so a typo is one line and exit 2, not N ranks x restarts failing alike;
- **ends with its own line**: its last line on stderr, on every exit path, is its one-line meaning.
  torch's launcher logs only its errors meanwhile, and nothing once that line is written (its warnings
  repeat what the line says, and a rendezvous thread could log after it); after the ranks are gone the
  launcher ignores further stop signals, so a late one cannot cut that line short.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from typing import Callable, List

from distseq.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_PREEMPTED, EXIT_USAGE, ConfigError
from distseq.ops import signals
from distseq.ops.quiet import LauncherLogs, quiet_logger

COMMANDS = ("train", "eval")  # the distseq commands that run on every rank
RELAYED = (EXIT_USAGE, EXIT_INTERRUPTED, EXIT_PREEMPTED)  # a rank's exit that means the same for the job
SHUTDOWN_TIMEOUT_S = "300"  # seconds the ranks get to save after a stop signal before SIGKILL
LOGS = LauncherLogs()  # torch's launcher's own log lines: errors only, and none after distseq's last line


def usage() -> str:
    from accelerate.commands.launch import launch_command_parser

    text = launch_command_parser().format_help()
    positional = text.find("\npositional arguments:")  # accelerate's options follow its usage and positionals
    options = text[text.find("\n\n", positional) + 2:] if positional >= 0 else text
    return (f"usage: distseq launch [ACCELERATE LAUNCH OPTIONS] {{{','.join(COMMANDS)}}} [OPTIONS]\n\n"
            + __doc__.split("\n", 2)[2].strip() + "\n\nExamples:\n"
            "  distseq launch --multi_gpu --num_processes 8 --max_restarts 2 train --preset default --run-dir runs/a\n"
            "  distseq launch --config_file accelerate_configs/fsdp.yaml train --run-dir runs/b\n\n"
            + options)


def launch(argv: List[str], check_train: Callable[[List[str], int], None]) -> int:
    """Parse accelerate's options, launch ``distseq.cli COMMAND ...`` on every rank, relay how they ended.
    ``check_train(options, world_size)``: the command line's check of ``train``'s options (raises ConfigError)."""
    from accelerate.commands.launch import _validate_launch_command

    first = next((i for i, a in enumerate(argv) if a in COMMANDS or a == "distseq.cli"), len(argv))
    if not argv or any(a in ("-h", "--help") for a in argv[:first]):  # the launcher's help, not accelerate's
        print(usage())
        return 0
    args = launcher_parser().parse_args(["--module", *argv])
    command, rest = args.training_script, list(args.training_script_args)
    if command == "distseq.cli" and rest:  # `accelerate launch`'s habit: `-m distseq.cli train ...`
        command, rest = rest[0], rest[1:]
    if command not in COMMANDS:
        raise no_command(repr(command))
    args.training_script, args.training_script_args = "distseq.cli", [command, *rest]
    try:
        with quiet_defaults():
            args, _, _ = _validate_launch_command(args)
    except (ValueError, OSError) as error:  # OSError: a --config_file that cannot be read
        raise ConfigError("launcher options", f"{str(error).strip().splitlines()[0]} (see distseq launch --help)"
                          ) from None
    elastic = (args.multi_gpu or args.use_fsdp) and not args.cpu
    if args.use_deepspeed or args.tpu or args.use_megatron_lm:
        raise ConfigError("launcher options", "distseq launch runs accelerate's multi-process (--multi_gpu, FSDP) "
                                              "and single-process launches; DeepSpeed, TPU and Megatron-LM are not "
                                              "distseq's")
    if args.max_restarts and not elastic:
        raise ConfigError("--max_restarts", "restarts need the multi-process launcher (--multi_gpu "
                                            "--num_processes N, or an FSDP config)")
    if command == "train":
        check_train(rest, (args.num_processes or 1) if elastic else 1)  # else accelerate starts one
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT_S)
    # what the elastic agent passes on to every rank: its default lacks SIGUSR1, which would end the launcher
    # alone and leave the ranks, in sessions of their own, training
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", signals.names())  # torchrun's --signals_to_handle
    if elastic and args.max_restarts:
        use_fresh_rendezvous_per_attempt(args)
    single = None if elastic else simple_launch(args)  # its checks too, before this process turns deaf below
    LOGS.open()
    try:
        return run_elastic(args) if elastic else run_single(single)
    finally:
        deaf_to_stop_signals()  # the ranks are gone: a late signal must not cut the last line short


def launcher_parser() -> argparse.ArgumentParser:
    """accelerate's launch parser, whose errors are one line pointing at ``distseq launch --help`` (its
    own print a usage of more than a hundred lines first)."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def refuse(message: str):
        if "training_script" in message:  # nothing after the launcher's options
            raise no_command("nothing")
        raise ConfigError("launcher options", f"{message} (see distseq launch --help)")

    parser.error = refuse
    return parser


def no_command(got: str) -> ConfigError:
    return ConfigError("COMMAND", f"expected a command to run on every rank, one of {', '.join(COMMANDS)}, after the "
                                  f"launcher's options (got {got}; see distseq launch --help)")


def quiet_defaults():
    """accelerate lists every option it defaulted (num_machines 1, mixed_precision no, ...) as a warning:
    distseq sets its own precision and these defaults are the intended ones."""
    return quiet_logger("accelerate.commands.launch", logging.ERROR)


def use_fresh_rendezvous_per_attempt(args: argparse.Namespace) -> None:
    """c10d rendezvous, each attempt's workers on a store of their own (rank 0 hosts it on a free port):
    the static rendezvous keeps one store for every attempt, where a restarted rank could read the addresses
    of the ranks that died (gloo: "connectFullMesh failed ... Connection refused"; NCCL: a stale unique id).
    On one machine the ranks' own per-attempt prefix (``distributed.accelerator.join_group``) would do; its
    name, torch's restart count, can differ between machines, and a fresh store needs none."""
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # also for a config file's own c10d
    if args.rdzv_backend != "static":
        return
    args.rdzv_backend = "c10d"
    if (args.num_machines or 1) > 1:
        args.same_network = False  # accelerate then passes --main_process_ip:port as the c10d endpoint
    else:
        args.standalone = True  # one machine: torch's own local c10d rendezvous on a free port


def run_elastic(args: argparse.Namespace) -> int:
    """accelerate's multi-process launcher (torch elastic's agent), and how it ended. accelerate 1.16 turns
    a stop signal, an interrupt and (quietly) a failed rank into ``sys.exit``; the exception it caught is
    the exit's context, and is read the same way as the exception itself (accelerate <= 1.15)."""
    from accelerate.commands.launch import multi_gpu_launcher

    try:
        with no_port_check_on_the_head(args):
            multi_gpu_launcher(args)
    except SystemExit as exit_info:
        return ended(exit_info.__context__ or exit_info)
    except Exception as error:  # noqa: BLE001 - every way the launch can end is one line
        return ended(error)
    except KeyboardInterrupt as interrupt:
        return ended(interrupt)
    return 0


def ended(how: BaseException) -> int:
    """The exit code and the launcher's last line for what ended the launch."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(how, ChildFailedError):
        rank, first = how.get_first_failure()
        return relay(rank, first.exitcode, len(how.failures))
    if isinstance(how, SignalException):
        return stopped(signal.Signals(how.sigval))
    if isinstance(how, KeyboardInterrupt):
        return stopped(signal.SIGINT)
    if isinstance(how, SystemExit):  # an exit of accelerate's own, with its code
        code = 0 if how.code is None else how.code if isinstance(how.code, int) else EXIT_FAILURE
        if code == 0:
            return 0
        return last_line(f"the launcher exited {code}; exiting {EXIT_FAILURE}", EXIT_FAILURE)
    # the launch itself failed: a rendezvous that timed out, a node that never came
    first = (str(how).strip().splitlines() or [""])[0][:300]
    return last_line(f"the launch failed: {type(how).__name__}: {first}; exiting {EXIT_FAILURE}", EXIT_FAILURE)


def last_line(text: str, code: int) -> int:
    """The launcher's final stderr line: nothing of torch's launcher follows it, from any thread."""
    LOGS.close()
    print(f"distseq launch: {text}", file=sys.stderr, flush=True)
    return code


def simple_launch(args: argparse.Namespace) -> tuple:
    """accelerate's command and environment for a one-process launch; its own checks as one line."""
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    try:
        return prepare_simple_launcher_cmd_env(args)
    except (AssertionError, ValueError) as error:
        raise ConfigError("launcher options", f"{(str(error).strip().splitlines() or ['invalid'])[0]} (one "
                                              f"process: several need --multi_gpu --num_processes N; see distseq "
                                              f"launch --help)") from None


def deaf_to_stop_signals() -> None:
    for sig in signals.catchable():
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def no_port_check_on_the_head(args: argparse.Namespace):
    """accelerate refuses to start the head node's launcher when the rendezvous port is already bound. Under
    c10d with several "machines" on one loopback host (tests, rehearsals) any node's agent may bind it
    first, so there the check is skipped; between real machines only the head binds it and the check
    stays."""
    import accelerate.utils.launch as accelerate_launch

    loopback = str(args.main_process_ip or "127.0.0.1").startswith("127.") or args.main_process_ip == "localhost"
    if args.rdzv_backend != "c10d" or (args.num_machines or 1) <= 1 or not loopback:
        yield
        return
    check = accelerate_launch.is_port_in_use
    accelerate_launch.is_port_in_use = lambda port=None: False
    try:
        yield
    finally:
        accelerate_launch.is_port_in_use = check


def run_single(single: tuple) -> int:
    """One process (accelerate's simple launcher's command and environment, checked before: ``single``), with
    the stop signals passed on to it and its exit code relayed."""
    cmd, env = single
    started: list = []
    pending: list = []  # a signal that arrived before the process existed

    def forward(signum, frame):
        (started[0].send_signal(signum) if started else pending.append(signum))

    for sig in signals.catchable():  # until the launch ends (then launch() makes the process deaf to them)
        signal.signal(sig, forward)
    # a session of its own, as torch's agent gives its ranks: a terminal's Ctrl-C reaches the launcher only,
    # which passes it on once (the rank's second SIGINT would exit without saving)
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    started.append(process)
    for signum in pending:
        process.send_signal(signum)
    code = process.wait()
    if code == 0:
        return 0
    return relay(0, code, 1)


def relay(rank: int, exitcode: int, failed: int) -> int:
    """The job's exit code from the first rank that failed, and the launcher's one line."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        how = f"was killed by {name} (failed: it could print no line of its own)"
    else:
        meaning = {EXIT_USAGE: "bad input", EXIT_INTERRUPTED: "interrupted",
                   EXIT_PREEMPTED: "preempted"}.get(exitcode, "failed")
        how = f"exited {exitcode} ({meaning}: its own line above says why)"
    code = exitcode if exitcode in RELAYED else EXIT_FAILURE
    others = f"; {failed - 1} other rank(s) failed too" if failed > 1 else ""
    return last_line(f"rank {rank} {how}{others}; exiting {code}", code)


def stopped(sig: signal.Signals) -> int:
    # a signal outside the table reaches here only when PET_SIGNALS_TO_HANDLE named it: a request to stop too
    code = signals.STOP_SIGNALS.get(sig, EXIT_PREEMPTED)
    return last_line(f"{sig.name}: passed to every rank, asking each to save at its next step boundary; "
                     f"exiting {code}", code)
