"""Exceptions of retrievekit: one base class, subclasses that also derive from the builtin."""

from __future__ import annotations


class RetrieveKitError(Exception):
    """Base class of every error raised by retrievekit."""


class ConfigError(RetrieveKitError, ValueError):
    """A setting has an invalid value; the message names the setting and the fix."""


class InvalidInputError(RetrieveKitError, ValueError):
    """An argument of a call (query, k, documents, filter) is invalid."""


class ModelNotFoundError(RetrieveKitError, OSError):
    """A model name or path could not be loaded (offline, unknown name, bad path)."""


class MissingDependencyError(RetrieveKitError, ImportError):
    """An optional dependency is not installed; the message names the pip install."""


class StoreMismatchError(RetrieveKitError, ValueError):
    """A store was opened with settings that would produce incompatible vectors or tokens."""


class StoreLockedError(RetrieveKitError, RuntimeError):
    """Another process holds the store directory open for writing."""


class StoreError(RetrieveKitError, RuntimeError):
    """The store could not be read or written (unwritable directory, server unreachable)."""


class StoreFullError(StoreError):
    """The disk holding the store is full; free space, then repeat the call."""
