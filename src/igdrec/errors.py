"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class IgdrecError(Exception):
    """A user-facing failure (bad input, missing artifact, unknown model...).

    The message must name the file and, where there is one, the line or record, so the user can fix it
    without a traceback.
    """

    exit_code = 2
