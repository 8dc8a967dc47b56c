"""The package's errors; each message says what went wrong and what to do."""


class ConceptorError(Exception):
    """Base class for the package's own errors."""


class ModelNotFoundError(ConceptorError, OSError):
    """A model name is neither a known short name, a local folder, a checkpoint file, nor in the hub cache."""


class CacheError(ConceptorError):
    """A cache entry cannot be read, or the cache folder cannot be written."""


class InvalidInputError(ConceptorError, ValueError):
    """An argument, setting, image or file is not what the function accepts; the message names the
    argument, the value it got and what is accepted."""


class ResultNotFoundError(InvalidInputError, FileNotFoundError):
    """The folder holds no saved result of that kind."""


class FitDivergedError(ConceptorError, FloatingPointError):
    """The fit produced NaN or infinite values (loss or coefficients); nothing was saved."""


class OutputError(ConceptorError, OSError):
    """The output folder cannot be written, or holds files the run would overwrite."""
