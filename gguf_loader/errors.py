"""The one exception type of the GGUF engine."""


class GGUFError(ValueError):
    """A malformed, truncated or unsupported GGUF file, or a tensor that cannot be dequantized.

    The message always names the file (or tensor) and what is wrong, with the offending value and
    what was expected, e.g. "model.gguf: tensor 'blk.3.ffn_up.weight': data ends at byte 90112, file
    has 65536". It subclasses ValueError so callers that already catch ValueError keep working.
    """
