"""The resident reference of a model streamed in a stream format: every weight the format encodes replaced by
decode(encode(w)), in its stored dtype. Streaming in the format must compute exactly this model: the format changes
values once, at staging (the codec itself is checked against gguf-py and torch's casts in test_stream_format.py)."""

import torch

from distorch.blocks import cluster_tensors, discover, live_bytes
from distorch.request import StreamFormat
from distorch.stream_format import BlockCodec


def with_format_values(model: torch.nn.Module, blocks, stream_format: str) -> list[str]:
    """Writes the format's values into the encoded weights of `blocks` (names) in place; returns their names."""
    changed = []
    for block in discover(model).blocks:
        if block.name not in blocks:
            continue
        codec = BlockCodec.build(block.clusters, StreamFormat.parse(stream_format))
        sources = [live_bytes(c, cluster_tensors(model, c)) for c in block.clusters]
        encoded = torch.empty(codec.encoded_nbytes, dtype=torch.uint8)
        codec.encode_into(encoded, sources)
        stored = torch.empty(codec.stored_nbytes, dtype=torch.uint8)
        codec.decode_into(encoded, stored)
        for coding, source in zip(codec.codings, sources):
            if coding.format is not StreamFormat.STORED:
                source.copy_(stored[coding.stored_offset:coding.stored_offset + coding.stored_nbytes])
                changed.append(coding.name)
    return changed
