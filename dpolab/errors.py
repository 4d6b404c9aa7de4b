"""User-facing errors. The command line prints them as one paragraph and exits non-zero, no traceback."""


class DpolabError(Exception):
    """A mistake in what the user gave us (settings, files, data), explained in its message."""


class ConfigError(DpolabError):
    """An unknown key, a value of the wrong type, or an impossible combination of settings."""


class DataError(DpolabError):
    """A data file or row that cannot be used; the message names the file, the line and the field."""


class TrainingError(DpolabError):
    """Training cannot go on (e.g. non-finite losses in a row); the last checkpoint is intact."""


class Interrupted(DpolabError):
    """SIGTERM or SIGINT arrived: a checkpoint was saved and the run stopped cleanly."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
