"""User-facing errors: each carries one line naming the file, line or field and what to do."""


class FeditError(Exception):
    """Base class of the errors the CLI prints as one line (no traceback)."""


class ConfigError(FeditError):
    """A bad key or value in a run config (TOML file or ``--set`` override)."""


class DataError(FeditError):
    """A data file that cannot be read or a row that fails validation."""


class ModelError(FeditError):
    """A base model or adapter that cannot be found or loaded."""
