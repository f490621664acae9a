"""The package's error types: what the ``fastinv`` command reports as a message, not a bug.

``fastinv.cli.main`` catches :class:`FastinvError` (and the OS errors of a bad path), prints
``fastinv <command>: <message>`` and exits with status 2; ``fastinv --debug ...`` shows the
traceback as well. Anything else is a bug and keeps its traceback.

Each subclass also derives from the built-in type that code catching errors before this module
existed expects (``ValueError``, ``FileNotFoundError``), so ``except ValueError`` still works.
"""

from __future__ import annotations


class FastinvError(Exception):
    """Bad input from the user (a value, a path, a file): the message says what to change."""


class BadFileError(FastinvError, ValueError):
    """A file exists but cannot be used: empty, truncated, corrupt, or of another kind."""


class CheckpointError(BadFileError):
    """A checkpoint that cannot be loaded or fails its checksum."""


class MissingFileError(FastinvError, FileNotFoundError):
    """A file or directory the command needs is not there."""


class DeviceError(FastinvError, RuntimeError):
    """The requested device is not available on this machine (``cuda`` without a GPU)."""
