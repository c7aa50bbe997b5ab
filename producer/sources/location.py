"""Reading a source given as a local path or a URL."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

from fewstep import UserError
from fewstep.settings import redact_url


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def read_bytes(location: str, *, what: str = "source") -> bytes:
    """The whole content of a local file or an http(s) URL."""
    if is_url(location):
        try:
            with urllib.request.urlopen(location, timeout=30) as response:
                return response.read()
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise UserError(
                f"cannot fetch {what} from {redact_url(location)}: {reason} "
                "(offline? pass --path with a local copy)"
            ) from None
    path = Path(location).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} path is a directory, expected a file: {path}") from None
    except PermissionError:
        raise UserError(f"{what} file is not readable (permission denied): {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} file {path}: {e.strerror}") from None
