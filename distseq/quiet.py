"""Other libraries' log messages that distseq says better itself, silenced for the length of one call."""

from __future__ import annotations

import contextlib
import logging


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.CRITICAL):
    """Only messages of ``level`` and above from logger ``name`` (and its children) while inside."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
