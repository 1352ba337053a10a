"""Logging like a library: structlog's API on top of the standard library's loggers.

Library modules log through :func:`get_logger` (``log = get_logger(__name__)``):
structured calls such as ``log.info("task.succeeded", task=..., id=...)`` become
ordinary :mod:`logging` records on the logger named after the module. Nothing is
printed unless the host application configured logging: the ``stem`` logger
carries a :class:`logging.NullHandler` (the standard library's rule for libraries),
and structlog's own global configuration is never touched, so a host that uses
structlog for itself keeps its setup.

Each record's message is ``event key=value ...`` (readable under any formatter) and
the structured fields ride along as ``record.stem_event``, which the CLI's formatter
(:func:`configure_logging`) renders as pretty console lines on a TTY or one JSON
object per line otherwise.

Event names are dotted, lower case, subject first: ``worker.started``,
``task.succeeded``, ``redis.reconnected``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import MutableMapping
from typing import Any

import orjson

# structlog (which imports rich's console and traceback when rich is installed) is
# imported by configure_logging's pretty renderer or a logger's bind(): a worker logging
# JSON lines does not load it (see _Logger).

#: The attribute of a LogRecord that carries the structured event dict.
EVENT_ATTR = "stem_event"
#: Log formats the CLI accepts for ``--log-format``.
LOG_FORMATS = ("auto", "pretty", "json")

logging.getLogger("stem").addHandler(logging.NullHandler())


class _Message:
    """A record's message, rendered only when a plain formatter asks for it.

    Stem's own formatter reads the structured fields instead, so the common path never
    pays for the ``event key=value ...`` string.
    """

    __slots__ = ("fields",)

    def __init__(self, fields: MutableMapping[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        event = str(self.fields.get("event", ""))
        rest = " ".join(f"{k}={v}" for k, v in self.fields.items() if k != "event")
        return f"{event} {rest}" if rest else event


def _to_stdlib(_: Any, method: str, event_dict: MutableMapping[str, Any]
               ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Last processor: ``(args, kwargs)`` for the stdlib logger's method."""
    exc_info = event_dict.pop("exc_info", None)
    fields = dict(event_dict)
    kwargs: dict[str, Any] = {"extra": {EVENT_ATTR: fields}}
    if exc_info:
        kwargs["exc_info"] = exc_info
    # No args: %-formatting is never applied, so a '%' in a value is safe.
    return (_Message(fields),), kwargs


def _processors() -> list[Any]:
    import structlog

    return [
        structlog.stdlib.filter_by_level,  # a disabled level costs one isEnabledFor call
        structlog.contextvars.merge_contextvars,
        _to_stdlib,
    ]


def emit(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """What ``get_logger(logger.name).<level>(event, **fields)`` does, for hot paths.

    The same record (message, ``stem_event`` fields, structlog context variables
    merged in) without structlog's processor chain, which costs about as much again as
    the record itself. Callers check ``logger.isEnabledFor(level)`` first, so a disabled
    level costs that one check: the worker's per-task lines use it.
    """
    fields = {"event": event, **fields}
    # Context variables are bound through structlog.contextvars: not imported, none bound.
    contextvars = sys.modules.get("structlog.contextvars")
    context = contextvars.get_contextvars() if contextvars is not None else None
    if context:
        for key, value in context.items():
            fields.setdefault(key, value)
    # Built directly: no findCaller() stack walk (the logger's name says where it is from).
    record = logger.makeRecord(logger.name, level, "", 0, _Message(fields), (), None,
                               extra={EVENT_ATTR: fields})
    logger.handle(record)


def _wrap(name: str) -> Any:
    import structlog

    return structlog.wrap_logger(
        logging.getLogger(name),
        processors=_processors(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


class _Logger:
    """What :func:`get_logger` returns: structlog's stdlib ``BoundLogger`` API without
    importing structlog for the level methods.

    ``debug`` ... ``critical`` and ``exception`` make the record structlog's chain
    (:data:`_processors`) makes: nothing at a disabled level, else the fields (the
    keywords, ``positional_args``, ``event``, then the context variables bound through
    ``structlog.contextvars``) as ``record.stem_event`` and the :class:`_Message`, with
    ``exc_info`` handed to the record. Like :func:`emit` it builds the record directly
    (no ``findCaller``: the caller structlog's chain reported was its own frame). Every
    other attribute (``bind``, ``new``, ...) is structlog's logger, built on first use.
    """

    __slots__ = ("_logger", "_name", "_stdlib")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stdlib = logging.getLogger(name)
        self._logger: Any = None

    def _log(self, level: int, event: Any, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        logger = self._stdlib
        if not logger.isEnabledFor(level):  # structlog's filter_by_level
            return
        exc_info = kw.pop("exc_info", None)
        fields = dict(kw)
        if args:
            fields["positional_args"] = args
        fields["event"] = event
        contextvars = sys.modules.get("structlog.contextvars")  # none bound without it
        if contextvars is not None:
            for key, value in contextvars.get_contextvars().items():
                fields.setdefault(key, value)
        if exc_info:  # as Logger._log reads it
            if isinstance(exc_info, BaseException):
                exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
            elif not isinstance(exc_info, tuple):
                exc_info = sys.exc_info()
        record = logger.makeRecord(logger.name, level, "", 0, _Message(fields), (),
                                   exc_info or None, extra={EVENT_ATTR: fields})
        logger.handle(record)

    def debug(self, event: Any = None, *args: Any, **kw: Any) -> None:
        self._log(logging.DEBUG, event, args, kw)

    def info(self, event: Any = None, *args: Any, **kw: Any) -> None:
        self._log(logging.INFO, event, args, kw)

    def warning(self, event: Any = None, *args: Any, **kw: Any) -> None:
        self._log(logging.WARNING, event, args, kw)

    def error(self, event: Any = None, *args: Any, **kw: Any) -> None:
        self._log(logging.ERROR, event, args, kw)

    def exception(self, event: Any = None, *args: Any, **kw: Any) -> None:
        kw.setdefault("exc_info", True)
        self._log(logging.ERROR, event, args, kw)

    def critical(self, event: Any = None, *args: Any, **kw: Any) -> None:
        self._log(logging.CRITICAL, event, args, kw)

    def __getattr__(self, name: str) -> Any:
        if self._logger is None:
            self._logger = _wrap(self._name)
        return getattr(self._logger, name)


def get_logger(name: str) -> Any:
    """A structlog logger writing to the stdlib logger ``name`` (use ``__name__``)."""
    return _Logger(name)


class StemFormatter(logging.Formatter):
    """Renders records carrying a structured event: pretty console lines or JSON.

    Records from other libraries (no ``stem_event``) are shown with their message, so
    one handler serves a whole process.
    """

    def __init__(self, *, json: bool) -> None:
        super().__init__()
        self.json = json
        self._console = None
        if not json:
            import structlog.dev

            self._console = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, EVENT_ATTR, None)
        event: dict[str, Any] = dict(fields) if isinstance(fields, dict) else {
            "event": record.getMessage()}
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}"
        if self.json:
            out = {"event": event.pop("event", ""), "timestamp": stamp,
                   "level": record.levelname.lower(), "logger": record.name, **event}
            if record.exc_info:
                out["exception"] = self.formatException(record.exc_info)
            return orjson.dumps(out, default=str).decode()
        assert self._console is not None
        event["timestamp"] = stamp
        event["level"] = record.levelname.lower()
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        return str(self._console(None, record.levelname.lower(), event))


def parse_level(level: str) -> int:
    """A level name (any case) as its number; ValueError listing the valid names."""
    names = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if level.upper() not in names:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(names)}")
    return logging.getLevelNamesMapping()[level.upper()]


def configure_logging(level: str = "INFO", *, json: bool | None = None) -> None:
    """Set up rendering for a Stem process: the CLI calls this, libraries never do.

    One stderr handler on the root logger (so the application's own logs show too);
    JSON lines when stderr is not a TTY (or ``json=True``), pretty lines on a TTY.
    """
    number = parse_level(level)
    use_json = (not sys.stderr.isatty()) if json is None else json
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(StemFormatter(json=use_json))
    handler.set_name("stem-cli")
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == "stem-cli":
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(number)
    logging.getLogger("stem").setLevel(number)
