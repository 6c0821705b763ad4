"""User-facing errors.

Everything a user can get wrong (a file, a field, an option) raises `UserError` with one line that
names the thing and says what to do. The CLI prints that line and exits with status 2; `--debug`
shows the traceback. Bugs stay ordinary exceptions.
"""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""

    exit_code = 2
