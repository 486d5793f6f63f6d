"""Who logs what: rank 0 logs at INFO; every other rank only its own errors.

The ranks of a run read the same config and data, so a library's warning (transformers,
datasets, ``warnings.warn``) would otherwise be printed once per rank, and a rank's INFO
lines would repeat rank 0's. An error is a rank's own (its data, its device): every rank
logs those.
"""

import logging

#: Libraries whose loggers do not propagate to the root logger (they have handlers of their own).
LIBRARY_LOGGERS = ("transformers", "datasets", "torch")


def setup_logging(rank: int) -> None:
    """Configure the root logger and the libraries' loggers of this process: level INFO on
    rank 0, ERROR elsewhere; ``warnings.warn`` goes through logging (logger ``py.warnings``)."""
    level = logging.INFO if rank == 0 else logging.ERROR
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s", force=True)
    logging.captureWarnings(True)
    if rank != 0:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def console_loggers() -> list[logging.Logger]:
    """The root logger and every library logger with handlers of its own: those whose
    console output must go around a progress bar."""
    return [logging.root] + [logging.getLogger(n) for n in LIBRARY_LOGGERS if logging.getLogger(n).handlers]
