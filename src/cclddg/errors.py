"""The exception type the CLI turns into a one-line message, and the warning type it prints as one line."""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to mend it."""


class OneLineWarning(UserWarning):
    """Something the user should know that does not stop the command (a skipped file, a damaged checkpoint passed
    over): the CLI prints it as one line, without the library's source line."""
