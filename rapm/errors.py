"""Errors a user can act on: each names the file, the field and the fix. The CLI prints them without a traceback."""


class RapmError(ValueError):
    """Base of every error rapm reports to a user."""
