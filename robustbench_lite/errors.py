"""The one error type the command line turns into "error: ..." on stderr and exit code 2.

Anything a user can get wrong (a name, an eps, a path, a checkpoint) raises AdvbenchError with a
message that names the problem. Everything else is a bug and keeps its traceback.
"""


class AdvbenchError(Exception):
    """Bad input or an unusable file: reported as one line, exit code 2."""


class UnknownNameError(AdvbenchError, KeyError):
    """A registry lookup for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
