"""Errors a user can fix: bad config, bad data, bad model path, busy run directory.

The command line turns every `InputError` into exit code 2 and prints its message,
which names the field or file and what was expected.
"""


class InputError(ValueError):
    """Input that cannot be used; the message names the field or file."""


def retryable(error: BaseException) -> bool:
    """Whether retrying a step that raised `error` may help: not for bad input, nor for an
    interrupt; any other failure may be transient (I/O, a network filesystem, the hub)."""
    return isinstance(error, Exception) and not isinstance(error, InputError)


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its first), or its type's name when it has none."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
