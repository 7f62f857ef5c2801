"""The one exception type the CLI turns into a one-line message."""


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to mend it."""
