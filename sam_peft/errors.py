"""The one exception type for problems with the user's input.

The CLI prints a UserError as a single line and exits with status 2; it never shows a
traceback. Anything else that escapes is a bug in sam-peft.
"""


class UserError(Exception):
    """Bad input: a config key, a value, a data file, a results directory.

    The message should name the place (file, file:line, or the dotted config key) and
    say what is wrong in one line.
    """


class ConfigKeyError(UserError):
    """A bad value under a known config key; the config loader adds the file and line."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class WriteError(UserError):
    """A file that could not be written: the disk is full, the folder is read-only or not ours.

    The environment's doing, not a bug: one line naming the file and the reason, no traceback.
    """
