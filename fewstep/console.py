"""Running a command-line entry point: user errors are one line, never a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

import click
import redis
from kombu.exceptions import OperationalError
from rich.console import Console

from fewstep import UserError
from fewstep.settings import describe_error
from fewstep.storage import StorageError

#: Width of tables written to a pipe or a file: wide enough that no column is cut (tables
#: take their natural width, not this).
PIPE_WIDTH = 1000


def stdout_console() -> Console:
    """A rich Console on stdout: a terminal's width there; in a pipe or a file (where rich would
    assume 80 columns and cut identifiers to "sampl…") wide enough for any table, unless
    ``COLUMNS`` says otherwise."""
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=PIPE_WIDTH)
    return console


def run(command: Callable[..., object], *, hard_exit: bool = False) -> None:
    """Invoke a click command; print UserError/StorageError as one line and exit non-zero.

    ``hard_exit``: once the command is over, flush stdout and stderr and leave with
    ``os._exit``, skipping the interpreter's teardown. pyarrow's native thread pools can
    abort a process in that teardown (``terminate called without an active exception``,
    SIGABRT; apache/arrow#34314), turning a command that finished its work into exit -6. The
    producer's commands hold nothing that needs a clean teardown: every write they make is
    done before they return.
    """
    code = _invoke(command)
    if hard_exit:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def _invoke(command: Callable[..., object]) -> int:
    """The command's exit code, having printed any error as one line."""
    try:
        code = command(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except (UserError, StorageError) as e:
        click.echo(f"error: {e}", err=True)
        return 2 if isinstance(e, UserError) else 1
    except (redis.ConnectionError, redis.TimeoutError, OperationalError) as e:
        # Redis went away after the command's first check (a restart, a failover): one line.
        # Every command is safe to run again; `producer reconcile JOB` sends any shard that
        # is neither committed nor queued.
        click.echo(f"error: lost the connection to Redis during the command ({describe_error(e)}); run it "
                   "again once Redis is back", err=True)  # fmt: skip
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except SystemExit as e:  # a command that exits itself
        if isinstance(e.code, str):
            click.echo(e.code, err=True)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code if isinstance(code, int) else 0
