"""The ``distseq`` console script and ``python -m distseq``: signal handling first, then the CLI."""

import sys

from distseq.ops.signals import install, run


def main() -> int:
    install()  # before importing the command line, which imports torch
    from distseq.cli import main as cli_main

    return run(cli_main)


if __name__ == "__main__":
    sys.exit(main())
