"""The exceptions the CLI turns into one-line messages, and the warning type it prints as one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' run on), or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(ValueError):
    """Bad input from the user: the message says what was wrong and how to mend it."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the last checkpoint."""


class SamplingInterrupted(Exception):
    """Ctrl-C or a stop signal during sampling: the message says what was kept (the singles written so far);
    `exit_code` is the interruption's (130 for Ctrl-C, 143 for a signal)."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class OneLineWarning(UserWarning):
    """Something the user should know that does not stop the command (a skipped file, a damaged checkpoint passed
    over): the CLI prints it as one line, without the library's source line."""
