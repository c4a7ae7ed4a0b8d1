"""Errors that reach users as one clear line: what (a file or setting) and what is wrong with it."""


class HemexError(Exception):
    """Base class for user-facing errors; the CLI prints str(err) and exits non-zero."""


class DataError(HemexError):
    """A file or folder does not follow the site data contract or cannot be read."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class ConfigError(HemexError):
    """A configuration value or command-line setting is invalid."""
