"""fewstep: synthetic image datasets from one-step and few-step text-to-image models.

This package holds what the producer and the worker share: the storage layout and
message contract (``contract``), settings (``settings``), object storage (``storage``),
the Celery wiring (``queue``) and local development services (``services``).
"""

__version__ = "0.1.0"


class UserError(Exception):
    """An error the user can fix (bad file, unknown model, unreachable service).

    Command-line entry points print its message as one line and exit non-zero.
    """
