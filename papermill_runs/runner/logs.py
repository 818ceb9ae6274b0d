"""papermill's log (its progress and the notebooks' cell outputs) on the runner's stdout, each line indented."""
from __future__ import annotations

import logging
import sys


class _PrefixedStdoutHandler(logging.Handler):
    """Writes papermill's log records to the *current* ``sys.stdout``, each line prefixed."""

    prefix = "  | "

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record).rstrip("\n")
            lines = msg.splitlines() or [""]
            sys.stdout.write("".join(f"{self.prefix}{line}\n" for line in lines))
            sys.stdout.flush()
        except Exception:  # pragma: no cover
            self.handleError(record)


_LOG_HANDLER = _PrefixedStdoutHandler()
_LOG_HANDLER.setFormatter(logging.Formatter("%(message)s"))
# "Executing Cell N---" is kept as progress; its "Ending Cell N---" twin is noise
_LOG_HANDLER.addFilter(lambda record: not str(record.msg).startswith("Ending Cell"))


def setup_logging() -> None:
    """Route the ``papermill`` logger (INFO and up) to the handler above, once, and only there."""
    logger = logging.getLogger("papermill")
    if _LOG_HANDLER not in logger.handlers:
        logger.addHandler(_LOG_HANDLER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
