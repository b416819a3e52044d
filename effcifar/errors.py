"""Typed errors. The CLI prints any `EffcifarError` as one line and exits non-zero."""


class EffcifarError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug."""


class ConfigError(EffcifarError):
    """A configuration file or option has a bad value; the message names file, field and expectation."""


class DataError(EffcifarError):
    """A dataset cannot be found, downloaded, verified or parsed."""


class WriteError(EffcifarError):
    """A file or run directory cannot be written: disk full, no permission, a file in its place, another writer."""


class DiskFull(WriteError):
    """A write failed for want of space; whatever runs stops (every later write would fail too)."""


class TrainingDiverged(EffcifarError):
    """The training loss became NaN or infinite; the run stops at the end of that epoch."""
