"""Errors with messages that say what to do."""


class ConceptorError(Exception):
    """Base class for the package's own errors."""


class ModelNotFoundError(ConceptorError, OSError):
    """A model name is neither a known short name, a local folder, nor in the local hub cache."""


class CacheError(ConceptorError):
    """A cache entry cannot be read, or the cache folder cannot be written."""
