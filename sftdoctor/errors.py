"""Errors that mean "the user's input is wrong": one line, exit code 2, no traceback of ours."""


class UserError(Exception):
    """Bad input or usage. The message says what is wrong and what to do, in one line."""

    exit_code = 2


class FailuresFound(AssertionError):
    """Raised by Report.raise_for_failures() when a report holds a fail finding."""
