"""The one exception the audio package raises for bad input."""

from __future__ import annotations


class AudioError(ValueError):
    """Audio could not be read or used. The message names the file (or the argument) and the problem."""
