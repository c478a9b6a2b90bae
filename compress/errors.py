"""User-facing errors: raised for bad input, shown as one message (no traceback) by the CLI."""


class CompressError(Exception):
    """A problem the user can fix: the message names the file/key/value and what is allowed."""
