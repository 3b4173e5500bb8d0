"""The one exception type for bad input: the CLI prints its message on one line and exits non-zero."""


class UserError(Exception):
    """A problem with what the user asked for or gave us (files, config, data); never a bug in sparsify.

    The message must say what is wrong and, where it helps, what would be valid, in one line.
    """
