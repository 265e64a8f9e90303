"""The ``distseq`` command line: ``python -m distseq.cli COMMAND`` (what launchers run) and the
``distseq`` console script. Light on purpose: the signal handlers are installed before anything
heavy is imported (``__main__.py``)."""


def main(argv=None) -> int:
    """Run one ``distseq`` command; returns its exit code (errors are one line on stderr)."""
    from distseq.cli.entry import main as run

    return run(argv)
