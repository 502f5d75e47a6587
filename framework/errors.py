"""User-facing errors: each says what is wrong and how to fix it, and the CLI prints it without a traceback."""


class RLHFError(Exception):
    """A problem with the user's input or environment (config, data, paths, servers), not a bug."""


class ConfigError(RLHFError):
    """A config value that cannot work (unknown key, bad path, wrong type)."""


class DataError(RLHFError):
    """Bad input data; the message names the file and, for row formats, the 1-based line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class TrackingError(RLHFError):
    """The MLflow tracking store cannot be reached or written."""


class ExpertError(RLHFError):
    """An expert cannot label a state; the message names the task (or teacher) and the state."""
