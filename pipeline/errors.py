"""Errors a user can fix; the CLI prints them as one line and exits with `exit_code`."""


class UserError(Exception):
    """Bad usage or bad input: exit 2, one line, no traceback."""

    exit_code = 2


class JobFailed(Exception):
    """A job ran and failed or was stopped: exit 1."""

    exit_code = 1


def last_line(error: BaseException | str, limit: int = 300) -> str:
    """The last non-empty line of an error's text: Ray's errors print their own frames first
    and end with the cause's `Type: message`, the line a user can act on."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:limit]


def first_line(error: BaseException | str, limit: int = 200) -> str:
    """The first non-empty line of an error's text, for errors that say what went wrong first
    and list details after (tarfile's "could not be opened successfully:", YAML's parser)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[0].rstrip(":") if lines else type(error).__name__)[:limit]
