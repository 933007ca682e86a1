"""What every ``pacs-node`` command shares: the configuration it reads, the node's resources, output as
a table or JSON, and the exit codes (0 success, 1 the operation failed, 2 bad configuration or usage)."""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, is_dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from sqlalchemy.exc import OperationalError, ProgrammingError

from pacs_node.config import ConfigError, Settings, config_path_from_env, load_settings
from pacs_node.ops.context import ServerContext

#: Piped output (``| grep``, a log file) is not cut or wrapped at 80 columns: a UID is 64 characters.
_PIPED_WIDTH = 100_000
out = Console(width=None if sys.stdout.isatty() else _PIPED_WIDTH)
err = Console(stderr=True, width=None if sys.stderr.isatty() else _PIPED_WIDTH)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_F = TypeVar("_F", bound=Callable[..., Any])


class CliState:
    """What the ``--config`` option of the top-level callback said, for the command that runs after it."""

    config_path: Path | None = None


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def config_path() -> Path | None:
    """The configuration file this command reads (``--config``, else the environment, else none)."""
    return config_path_from_env(CliState.config_path)


def settings() -> Settings:
    try:
        return load_settings(config_path())
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(2) from None


def runtime(s: Settings) -> ServerContext:
    """The node's database and store, as they are (no migration: that is ``pacs-node db upgrade``)."""
    try:
        return ServerContext.open(s, migrate=False)
    except Exception as exc:
        fail(f"cannot open the database or store: {exc}")


def jsonable(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        # the database's naive datetimes are UTC: say so
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(value), indent=2) + "\n")


def print_outcome(as_json: bool, value: dict[str, Any], text: str) -> None:
    """A command's outcome: ``value`` for a script (``--json``), ``text`` for a person."""
    if as_json:
        print_json(value)
    else:
        out.print(text)


def db_errors(fn: _F) -> _F:
    """Turn a database error into one line that says what to do, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OperationalError, ProgrammingError) as exc:
            fail(f"database error: {exc.orig} (has the schema been created? run `pacs-node db upgrade`)")

    return wrapper  # type: ignore[return-value]


_DURATION = re.compile(r"^(?P<n>\d+(?:\.\d+)?)(?P<unit>[smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str, option: str = "--older-than") -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        fail(f"{option}: {text!r} is not a duration like 30m, 12h, 7d or 2w", 2)
    return timedelta(seconds=float(match["n"]) * _UNIT_SECONDS[match["unit"]])
