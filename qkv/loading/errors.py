"""The one exception the loading package raises."""

from __future__ import annotations

from qkv.config import ConfigError


class LoadError(ConfigError):
    """A model could not be loaded. The message names the file and the problem.

    It subclasses ``ConfigError`` (a ``ValueError``) so that callers catching
    either see a config problem found while loading as one error.
    """
