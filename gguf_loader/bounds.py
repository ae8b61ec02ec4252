"""What a GGUF header may cost to read: the bounds the parser (gguf_header.py) enforces before it expands anything.

A well-formed but hostile file can ask a reader to build millions of Python objects: 192 MB of nested empty
arrays took 37 s and 1.4 GB in `python -m distorch plan`, 2.5 GB of metadata strings 13 s and 5.2 GB, before
these bounds. Each bound is checked before the values it covers are built, so a file past one is refused with
one line naming the file and the key; the costliest file within all of them (4 million short strings, or
256 MiB of string values) reads in about 1.5 s and raises peak RSS by about 0.6 GB, half of it mapped file pages.

Real files sit far below every bound: the largest vocabularies hold ~262,000 tokens and ~520,000 merges
(~1.3 million array items, ~16 MB of metadata in llama.cpp's ggml-vocab-gemma-4.gguf), files have tens of keys
plus one `comfy.gguf.orig_shape.*` key per reshaped tensor, and llama.cpp's own reader refuses nested arrays
and tensor names of 64 bytes or more.
"""

MAX_HEADER_BYTES = 1 << 28  # 256 MiB before the tensor data: metadata keys and values and the tensor table
MAX_METADATA_KEYS = 1 << 17  # 131,072 keys
MAX_STRING_BYTES = 1 << 26  # 64 MiB in one string (a whole tokenizer.json embedded as one value is ~30 MB)
MAX_ARRAY_ITEMS = 1 << 21  # 2,097,152 items in one array (4x the largest merges array)
MAX_METADATA_ITEMS = 1 << 22  # 4,194,304 array items in all arrays of the file together (3x the largest vocabulary)
MAX_NESTED_ARRAYS = 1 << 16  # 65,536 arrays inside arrays, in all (gguf-py writes them; llama.cpp refuses any)
MAX_ARRAY_NESTING = 8  # levels of arrays inside arrays
MAX_TENSORS = 1 << 17  # 131,072 tensors (the largest real files hold a few thousand)
