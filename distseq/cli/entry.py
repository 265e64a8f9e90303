"""The command line's entry: plugins first, then the parser, one command, and every error as one line
with its exit code (the errors' own, ``distseq.errors``; 130 for an interrupt before the run's own
handling began; 1 for what distseq could not foresee, a lost peer, a full memory, a failed write)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from distseq.cli.commands import COMMANDS
from distseq.cli.parser import build_parser, imports_in
from distseq.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ConfigError,
    DistseqError,
    StartupStopped,
    Stopped,
)
from distseq.registry import import_plugins


def fail(message: str, code: int = EXIT_USAGE, every_rank: bool = False):
    """One line on stderr and exit. Errors every rank meets alike are printed by rank 0 only."""
    if every_rank or os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    command = next((a for a in argv if not a.startswith("-")), "")
    try:
        import_plugins(imports_in(argv))  # before the parser: plugins' names and options are in --help
        if argv and argv[0] == "launch":  # accelerate's own options follow, parsed by accelerate's parser
            args = argparse.Namespace(command="launch", launch_args=argv[1:])
        else:
            args = build_parser().parse_args(argv)
    except ConfigError as error:
        fail(f"distseq {command}: error: {error}".replace("  ", " "))
    try:
        return COMMANDS[args.command](args) or 0
    except DistseqError as error:
        if isinstance(error, Stopped) and error.step is not None:
            return error.exit_code  # saved, and the line saying so was printed
        fail(f"distseq {args.command}: error: {error}", code=error.exit_code, every_rank=error.every_rank)
    except StartupStopped as stop:
        fail(f"distseq {args.command}: {stop}", code=stop.exit_code)
    except KeyboardInterrupt:  # a SIGINT before the run's own handling began (imports, argument checks)
        fail(f"distseq {args.command}: interrupted (SIGINT); nothing was saved", code=EXIT_INTERRUPTED)
    except MemoryError:
        fail(f"distseq {args.command}: error: out of memory; choose smaller sizes (--hidden-size, "
             f"--global-batch-size, --eval-size, --block-size)", code=EXIT_FAILURE, every_rank=True)
    except OSError as error:  # a file the checks above could not foresee (a disk filling up mid-run, ...)
        where = f"{error.filename}: " if error.filename else ""
        fail(f"distseq {args.command}: error: {where}{error.strerror or error}", code=EXIT_FAILURE, every_rank=True)
    except RuntimeError as error:
        from distseq.distributed.accelerator import is_collective_failure

        if _is_out_of_memory(error):
            fail(f"distseq {args.command}: error: out of memory ({str(error).splitlines()[0][:200]}); choose "
                 f"smaller sizes (--hidden-size, --global-batch-size, --eval-size)", code=EXIT_FAILURE, every_rank=True)
        if not is_collective_failure(error):
            raise
        # a peer died or a collective timed out (--dist-timeout-s): say so in one line instead of hanging
        fail(f"distseq {args.command}: error: lost contact with another process: {str(error).splitlines()[0][:300]}",
              code=EXIT_FAILURE, every_rank=True)
    return 0


def _is_out_of_memory(error: RuntimeError) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)
