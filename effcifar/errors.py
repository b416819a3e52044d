"""Typed errors. The CLI prints any `EffcifarError` as one line and exits non-zero."""

import re

# user:password@ in any URL (up to the last '@' of the word, so a password holding an unencoded '@' goes whole), and
# the value of a query parameter whose name says it is a secret (password=, token=, ...; any case)
_USERINFO = re.compile(r"(\w[\w+.-]*://[^\s:/@'\"]*):[^\s'\"]*@")
_SECRET_PARAM = re.compile(r"([?&][^=\s&'\"]*(?:password|passwd|token|secret|api_?key)[^=\s&'\"]*=)[^&\s'\"#]*",
                           re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it masked (`user:***@`, `password=***`)."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1:***@", text))


class EffcifarError(Exception):
    """Base class for errors caused by user input or the environment, not by a bug.

    Its message never shows a URL's credentials (a mirror's, a storage's), wherever the value came from.
    """

    def __str__(self) -> str:
        return redact(super().__str__())


class ConfigError(EffcifarError):
    """A configuration file or option has a bad value; the message names file, field and expectation."""


class DataError(EffcifarError):
    """A dataset cannot be found, downloaded, verified or parsed."""


class WriteError(EffcifarError):
    """A file or run directory cannot be written: disk full, no permission, a file in its place, another writer."""


class DiskFull(WriteError):
    """A write failed for want of space; whatever runs stops (every later write would fail too)."""


class Interrupted(EffcifarError):
    """A signal (Ctrl-C, SIGTERM) stopped the work after saving what resumes it; the CLI exits 130."""


class TrainingDiverged(EffcifarError):
    """The training loss became NaN or infinite; the run stops at the end of that epoch."""
