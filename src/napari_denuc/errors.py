"""The one exception type for problems a user can cause and fix."""


class DenucError(Exception):
    """Bad input, a wrong or missing model, gated access...

    The message is one line that says what went wrong and what to do about it.
    The CLI prints it without a traceback and exits non-zero.
    """
