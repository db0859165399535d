"""Errors a user can fix: bad config, bad data, bad model path, busy run directory.

The command line turns every `InputError` into exit code 2 and prints its message,
which names the field or file and what was expected.
"""


class InputError(ValueError):
    """Input that cannot be used; the message names the field or file."""
