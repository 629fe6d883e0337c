"""Errors a user can fix; the CLI prints them as one line and exits with `exit_code`."""


class UserError(Exception):
    """Bad usage or bad input: exit 2, one line, no traceback."""

    exit_code = 2


class JobFailed(Exception):
    """A job ran and failed or was stopped: exit 1."""

    exit_code = 1
