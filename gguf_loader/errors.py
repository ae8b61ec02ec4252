"""The one exception type of the GGUF engine, and bounded echoes of untrusted values for its messages."""

import reprlib


class GGUFError(ValueError):
    """A malformed, truncated or unsupported GGUF file, or a tensor that cannot be dequantized.

    The message always names the file (or tensor) and what is wrong, with the offending value and
    what was expected, e.g. "model.gguf: tensor 'blk.3.ffn_up.weight': data ends at byte 90112, file
    has 65536". It subclasses ValueError so callers that already catch ValueError keep working.
    """

    # ComfyUI shows `module + "." + qualname` as the error's type, and it names a custom node's modules by
    # their file path ("/…/custom_nodes/<pack>.gguf_loader.errors"); the public import path reads better.
    __module__ = "gguf_loader"


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

    Names, keys and values come from untrusted files: a 2,000,000-entry shape or a 1 MB tensor name must
    not become a megabyte error line, and a value nested 1,000 levels deep must not raise RecursionError.

    Example:
        >>> echo("blk.0." + "x" * 500)[:20]
        "'blk.0.xxxxxxxxxxxxx"
    """
    if type(value) is str and len(value) < ECHO_CHARS:  # the common case (names, keys), at repr's speed
        text = repr(value)
        if len(text) <= ECHO_CHARS:
            return text
    text = _ECHO.repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."
