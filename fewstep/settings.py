"""Settings: command-line flags, then environment, then ``config/`` defaults."""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fewstep import UserError


def config_dir() -> Path:
    """Directory of the TOML config files (``FEWSTEP_CONFIG_DIR`` overrides)."""
    override = os.environ.get("FEWSTEP_CONFIG_DIR")
    if override:
        return Path(override)
    return Path(str(resources.files("fewstep.config")))


@cache
def _load(name: str, directory: str) -> dict[str, Any]:
    path = Path(directory) / f"{name}.toml"
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file missing: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def load_config(name: str) -> dict[str, Any]:
    """One config file (``defaults``, ``models``, ``datasets``) as a dict."""
    return _load(name, str(config_dir()))


def defaults() -> dict[str, Any]:
    return load_config("defaults")


def broker_url() -> str:
    """The Celery broker URL: ``CELERY_BROKER_URL`` or the configured default."""
    return os.environ.get("CELERY_BROKER_URL") or defaults()["queue"]["broker_url"]


def queue_prefix() -> str:
    return os.environ.get("FEWSTEP_QUEUE_PREFIX") or defaults()["queue"]["prefix"]


def visibility_timeout() -> int:
    value = os.environ.get("FEWSTEP_VISIBILITY_TIMEOUT")
    return int(value) if value else int(defaults()["queue"]["visibility_timeout"])


def read_ahead() -> bool:
    """Whether workers read the next shard ahead: ``FEWSTEP_READ_AHEAD`` (0/1) or the configured default."""
    value = os.environ.get("FEWSTEP_READ_AHEAD")
    if value is None or value == "":
        return bool(defaults()["worker"]["read_ahead"])
    if value not in ("0", "1"):
        raise UserError(f"FEWSTEP_READ_AHEAD must be 0 or 1, not {value!r}")
    return value == "1"


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, safe for logs and messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{host}" if parts.password is not None else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


_PASSWORD_IN_URL = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")


def mask_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by ``***``."""
    return _PASSWORD_IN_URL.sub(r"\1***@", text)


def redact(text: str) -> str:
    """``text`` without credentials, for logs, records and heartbeats: URL passwords masked,
    and the secrets of this process's environment (S3 secret key and session token, the
    broker's password) replaced by ``***`` wherever they appear."""
    secrets = [os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")]
    broker = os.environ.get("CELERY_BROKER_URL")
    if broker:
        with contextlib.suppress(ValueError):
            secrets.append(urlsplit(broker).password)
    text = mask_passwords(text)
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def describe_error(error: object, limit: int = 2000) -> str:
    """One line naming an error (type and message), without credentials, at most ``limit`` characters."""
    if isinstance(error, BaseException):
        text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    else:
        text = str(error)
    return redact(" ".join(text.split()))[:limit]
