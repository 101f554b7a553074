"""Errors a user can act on: each names the file, the field and the fix. The CLI prints them without a traceback."""


class RapmError(ValueError):
    """Base of every error rapm reports to a user."""


class WriteError(RapmError):
    """A file could not be written (a full disk, no permission); what was written before it is intact."""
