"""Bounded echoes of untrusted values (file headers, user strings) for one-line error messages.

The GGUF engine has the same helper (gguf_loader.errors.echo): it imports nothing from distorch.
"""

import reprlib

ECHO_CHARS = 80


class _Echo(reprlib.Repr):
    """reprlib with limits for one-line messages; huge integers are described, not converted."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 3, 8, 8, 4
        self.maxstring = self.maxother = ECHO_CHARS - 20
        self.maxlong = 40

    def repr_int(self, value: int, level: int) -> str:
        if value.bit_length() > 256:  # str() of a huge int is quadratic, and refused past 4300 digits
            return f"<{value.bit_length()}-bit integer>"
        return super().repr_int(value, level)


_ECHO = _Echo()


def echo(value) -> str:
    """`repr(value)` cut to at most ECHO_CHARS characters (middle elided, nesting and items bounded).

    A 2,000,000-entry shape, a 5,000-digit amount or a 1 MB tensor name must not become a megabyte error
    line, and a value nested 1,000 levels deep must not raise RecursionError.

    Example:
        >>> echo(list(range(10**6)))
        '[0, 1, 2, 3, 4, 5, 6, 7, ...]'
    """
    if type(value) is str and len(value) < ECHO_CHARS:  # the common case, at repr's speed
        text = repr(value)
        if len(text) <= ECHO_CHARS:
            return text
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."
