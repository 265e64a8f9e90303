"""matplotlib for the reports' PNGs (the bench report, the sweep report), where it is installed.

matplotlib is the optional ``bench`` extra: a report without it still writes its tables and
``report.md``, and says in one line how to get the plots.
"""

from __future__ import annotations

INSTALL_HINT = "plots need matplotlib: pip install -e '.[bench]' (or pip install matplotlib)"


def plots_hint(command: str) -> str:
    """The line a report prints without matplotlib: how to get its plots."""
    return f"{INSTALL_HINT}, then run {command} again"


def pyplot():
    """``matplotlib.pyplot`` drawing to files only (the Agg backend: no display needed, safe in a job without
    one), or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
