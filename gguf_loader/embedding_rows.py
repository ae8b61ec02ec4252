"""Token ids past a GGUF embedding table: one line naming the token and the file, never torch's IndexError.

llama.cpp's converters cut the embedding table to the vocabulary they write, while ComfyUI's tokenizers can emit ids
past it. ComfyUI's Gemma 3 tokenizers (comfy/text_encoders/lt.py, lumina2.py) read the literal text
`<image_soft_token>` as id 262144 whatever the vocabulary; Google's safetensors have that row (262,208 rows), a
llama.cpp Gemma 3 GGUF does not (262,144 rows). The row's values are not in the file, so ComfyUI's result for the
safetensors model cannot be reproduced: the GGUF Embedding layer refuses such ids instead (`check_token_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from gguf import Keys, TokenType

from .encoders import family_for
from .errors import GGUFError, echo

EMBEDDING_TENSOR = "token_embd.weight"
_MAX_NAMED = 16  # ids named from the file's own vocabulary; the rest get the plain message
_UNUSED = int(TokenType.UNUSED)


class NamedId(NamedTuple):
    """An id past a table that a tokenizer emits for known text, and what the user can do about it."""

    token_id: int
    text: str
    hint: str


@dataclass(frozen=True)
class EmbeddingTable:
    """A GGUF file's token embedding table and the ids its tokenizer can emit past it (for error messages).

    Attributes:
        source: "model.gguf: tensor 'token_embd.weight'".
        rows: the table's row count.
        named_ids: the ids >= rows that a tokenizer emits for known text.
    """

    source: str
    rows: int
    named_ids: tuple[NamedId, ...] = ()


def embedding_table(gguf_file) -> EmbeddingTable | None:
    """The file's `token_embd.weight` table and the tokens past its end, or None for a file without one."""
    table = gguf_file.tensors.get(EMBEDDING_TENSOR)
    if table is None or len(table.shape) != 2:
        return None
    rows = table.shape[0]
    named = [NamedId(token_id, text, hint) for text, token_id, hint in _fixed_ids(gguf_file.architecture)
             if token_id >= rows]
    named += _vocabulary_past(gguf_file.metadata, rows, {entry.token_id for entry in named})
    return EmbeddingTable(f"{gguf_file.path}: tensor {echo(EMBEDDING_TENSOR)}", rows, tuple(named))


def _vocabulary_past(metadata, rows: int, known: set[int]) -> list[NamedId]:
    """Tokens of the file's vocabulary past the table that a rebuilt tokenizer can match (UNUSED ones never are)."""
    tokens, types = metadata.get(Keys.Tokenizer.LIST), metadata.get(Keys.Tokenizer.TOKEN_TYPE)
    if not isinstance(tokens, list) or len(tokens) <= rows:
        return []
    named = []
    for token_id in range(rows, len(tokens)):
        kind = types[token_id] if isinstance(types, list) and token_id < len(types) else None
        if kind != _UNUSED and token_id not in known and type(tokens[token_id]) is str:
            named.append(NamedId(token_id, tokens[token_id], "the file's vocabulary has the token but its embedding "
                                                             "table lacks the row; remove it from the prompt"))
            if len(named) == _MAX_NAMED:
                break
    return named


def check_token_ids(ids: torch.Tensor, rows: int, source: str, tables: tuple[EmbeddingTable, ...] = ()) -> None:
    """Raises GGUFError when an id is outside 0..rows-1; one min/max per call (a single device sync on a GPU).

    Args:
        ids: the token ids given to the embedding layer.
        rows: its table's row count.
        source: names the table when no entry of `tables` describes it (the weight's file and tensor, or "").
        tables: the model's GGUF embedding tables; the one with `rows` rows names the file and known tokens.
    """
    if ids.numel() == 0:
        return
    low, high = torch.stack((ids.min(), ids.max())).tolist()
    if low >= 0 and high < rows:
        return
    bad = high if high >= rows else low
    table = next((t for t in tables if t.rows == rows), None)
    where = table.source if table is not None else source or "GGUF embedding table"
    named = next((entry for entry in table.named_ids if entry.token_id == bad), None) if table is not None else None
    if named is not None:
        raise GGUFError(f"{where}: the prompt holds {echo(named.text)}, token id {bad}, past the {rows} rows of the "
                        f"embedding table: {named.hint}")
    raise GGUFError(f"{where}: token id {bad} is outside the embedding table's {rows} rows (0..{rows - 1})")


def _fixed_ids(architecture: str | None) -> tuple[tuple[str, int, str], ...]:
    """(text, id, hint) that ComfyUI's tokenizer for `architecture` emits whatever the vocabulary (its family's)."""
    family = family_for(architecture)
    return () if family is None else family.fixed_token_ids(architecture)
