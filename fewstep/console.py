"""Running a command-line entry point: user errors are one line, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import click

from fewstep import UserError
from fewstep.storage import StorageError


def run(command: Callable[..., object]) -> None:
    """Invoke a click command; print UserError/StorageError as one line and exit non-zero."""
    try:
        code = command(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (UserError, StorageError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2 if isinstance(e, UserError) else 1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
