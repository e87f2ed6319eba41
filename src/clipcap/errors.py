"""The base of every error a user can act on; the CLI prints these without a traceback."""


class ClipcapError(Exception):
    """A problem with the user's input, data or environment, with a message saying how to fix it."""
