"""The kit's error base class: the CLI reports these as one clear line instead of a traceback."""


class MetaloraError(Exception):
    """Bad input or state that the user can fix; the message names what is wrong and where."""
