"""``python -m distseq.cli``: the stop signals' one-line handlers first, then the command line."""

import sys

from distseq.ops.signals import install, run

install()  # before the heavy imports: a signal during start-up is one line, not a traceback

from distseq.cli import main  # noqa: E402

sys.exit(run(main))
