"""The project's one exception for expected problems."""


class UserError(ValueError):
    """A problem with what the user gave (a path, a setting, a file) that they can fix: the command prints
    this one line and exits with status 2. Any other exception is a bug and keeps its traceback.
    A ValueError, so that callers which catch bad values also catch it."""
