"""kernelhub's logging and progress bars: one logger tree, one verbosity, one rule for bars.

Every module logs through `logging.getLogger(__name__)`, so all records sit under the
`"kernelhub"` logger. This file is the one place that configures it:

- its level comes from `KERNELHUB_VERBOSITY` (`debug`, `info`, `warning`, `error`,
  `critical`, or a number), read once at import; default `warning`. `set_verbosity` changes it.
- it gets one stderr handler, which stays silent as soon as the application configures
  logging itself (a handler on the root logger or on `"kernelhub"`): records then reach
  those handlers by normal propagation, never twice.

Progress bars are tqdm bars made by `progress`; `HF_HUB_DISABLE_PROGRESS_BARS=1` (the variable
huggingface_hub reads for its own download bars) and a verbosity of `error` or quieter turn
them all off.

>>> import logging
>>> set_verbosity("info")
>>> logging.getLogger("kernelhub").level == logging.INFO
True
>>> set_verbosity(logging.WARNING)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import threading

from kernelhub.declare.errors import KernelhubError

ROOT = "kernelhub"
VERBOSITY_ENV = "KERNELHUB_VERBOSITY"
PROGRESS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment variable
_ONCE_LIMIT = 1024  # distinct once-only messages remembered per process (oldest forgotten first)


def parse_verbosity(value, *, source: str = VERBOSITY_ENV) -> int:
    """A logging level from a name (any case) or a number; `KernelhubError` naming `source` otherwise.

    >>> parse_verbosity("Info"), parse_verbosity("10")
    (20, 10)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise KernelhubError(f"{source}={value!r} is negative; valid: {', '.join(LEVELS)} or a number >= 0")
        return value
    text = str(value).strip().lower()
    if text in LEVELS:
        return LEVELS[text]
    if text.isdigit():
        return int(text)
    raise KernelhubError(f"{source}={value!r} is not a verbosity; valid: {', '.join(LEVELS)} "
                         "(any case) or a number >= 0, such as 20 for info")


def set_verbosity(level) -> None:
    """Set the level of every kernelhub logger (a name such as "info", or a `logging` level)."""
    logging.getLogger(ROOT).setLevel(parse_verbosity(level, source="verbosity"))


def get_verbosity() -> int:
    """The level of the `"kernelhub"` logger."""
    return logging.getLogger(ROOT).getEffectiveLevel()


class _DefaultHandler(logging.StreamHandler):
    """kernelhub's own stderr handler, used only while nobody configured logging."""

    def __init__(self):
        super().__init__()  # stream resolved per record (below), so redirected stderr is honoured
        self.setFormatter(logging.Formatter("[kernelhub] %(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ assigns it; we always write to the current stderr
        pass

    def emit(self, record):
        if logging.getLogger().handlers or any(h is not self for h in logging.getLogger(ROOT).handlers):
            return  # the application has handlers: propagation reaches them, so ours would duplicate
        super().emit(record)


def configure(environ=None) -> logging.Logger:
    """Set the `"kernelhub"` level from `KERNELHUB_VERBOSITY` and add the default handler once."""
    environ = os.environ if environ is None else environ
    logger = logging.getLogger(ROOT)
    raw = environ.get(VERBOSITY_ENV, "").strip()
    logger.setLevel(parse_verbosity(raw) if raw else logging.WARNING)
    if not any(isinstance(h, _DefaultHandler) for h in logger.handlers):
        logger.addHandler(_DefaultHandler())
    return logger


_once_lock = threading.Lock()
_once: collections.OrderedDict = collections.OrderedDict()


def first_time(key) -> bool:
    """True the first time `key` is seen in this process, False after (see `log_once`)."""
    with _once_lock:
        if key in _once:
            _once.move_to_end(key)
            return False
        _once[key] = None
        while len(_once) > _ONCE_LIMIT:
            _once.popitem(last=False)
    return True


def log_once(logger: logging.Logger, level: int, key, msg: str, *args) -> bool:
    """Log `msg` the first time `key` is seen in this process; True when it was logged.

    The memory is bounded (the oldest keys are forgotten first), so a long-running server
    that binds many models cannot grow it without limit.

    >>> forget_once()
    >>> [log_once(logging.getLogger("kernelhub.example"), logging.DEBUG, "k", "once") for _ in range(2)]
    [True, False]
    """
    if not first_time(key):
        return False
    logger.log(level, msg, *args)
    return True


def forget_once() -> None:
    """Forget which once-only messages were logged (for tests)."""
    with _once_lock:
        _once.clear()


@contextlib.contextmanager
def captured_logs(level=logging.DEBUG, logger: str = ROOT):
    """Collect the `LogRecord`s of `logger` (and its children) at `level` or above, inside the block.

    Works whatever pytest's logging plugin does (this project runs pytest with `-p no:logging`,
    so `caplog` is not available); the logger's level is restored afterwards.

    >>> with captured_logs() as records:
    ...     logging.getLogger("kernelhub.example").info("hello")
    >>> [r.getMessage() for r in records]
    ['hello']
    """
    records: list[logging.LogRecord] = []
    handler = logging.Handler(parse_verbosity(level, source="level"))
    handler.emit = records.append
    target = logging.getLogger(logger)
    old = target.level
    target.addHandler(handler)
    target.setLevel(min(target.getEffectiveLevel(), handler.level))
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(old)


def progress_disabled(disable: bool | None = None) -> bool | None:
    """What `progress` passes to tqdm as `disable`: True when bars are off for kernelhub.

    Off when `HF_HUB_DISABLE_PROGRESS_BARS` is true (it wins over `disable=False`, as in
    huggingface_hub) or the verbosity is `error` or quieter; else `disable` as given
    (None: tqdm shows the bar on a terminal only).
    """
    if os.environ.get(PROGRESS_ENV, "").upper() in _TRUE or get_verbosity() >= logging.ERROR:
        return True
    return disable


def progress(iterable=None, *, desc: str, total: int | None = None, disable: bool | None = None, **kwargs):
    """A tqdm bar over `iterable` (or a manual one, with `total` and `.update()`), following kernelhub's rule.

    `disable=None` shows it on a terminal only; `disable=False` forces it (onto `file=`, a
    terminal or not), unless bars are off (see `progress_disabled`). Bars write to stderr
    and leave no line behind unless `leave=True`.

    >>> import io
    >>> out = io.StringIO()
    >>> sum(progress(range(3), desc="adding", disable=True, file=out)), out.getvalue()
    (3, '')
    """
    from tqdm import tqdm  # imported on first use: importing kernelhub stays cheap

    kwargs.setdefault("leave", False)
    return tqdm(iterable, desc=desc, total=total, disable=progress_disabled(disable), **kwargs)


def _configure_at_import() -> None:
    # A bad KERNELHUB_VERBOSITY must not make `import kernelhub` (and so every CLI command)
    # fail with a traceback: say so once, in one line, and keep the default level.
    try:
        configure()
    except KernelhubError as e:
        logging.getLogger(ROOT).setLevel(logging.WARNING)
        if not any(isinstance(h, _DefaultHandler) for h in logging.getLogger(ROOT).handlers):
            logging.getLogger(ROOT).addHandler(_DefaultHandler())
        logging.getLogger(__name__).warning("%s; using warning", e)


_configure_at_import()
