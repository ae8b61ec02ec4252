"""When a list holding a single module is a block list: the rule that live discovery (blocks.py) and the
file-header reader (headers.py) share, so the node and the CLI find the same blocks.

A list with two or more modules of one class is a block list by its shape. A list with one module is
ambiguous: `double_blocks` of a 1+1-block Flux holds a whole transformer block, while a model's
`final_layers = ModuleList([FinalLayer])` holds a small output head. Size tells them apart: a lone
module is a block when it weighs about as much as the model's blocks (at least a quarter of the median
repeated block) or, in a model without repeated blocks, a real share of the model (at least 1/16).
A final layer is well under 10% of one transformer block in every DiT (Flux: 19M vs 340M parameters).

Imports nothing: the CLI plans from file headers without torch.
"""

from collections.abc import Mapping, Sequence

LONE_MIN_SHARE_OF_MEDIAN_BLOCK = 1 / 4
LONE_MIN_SHARE_OF_MODEL = 1 / 16


def accepted_lone_blocks(lone: Mapping[str, int], repeated_block_bytes: Sequence[int], model_bytes: int) -> set[str]:
    """Names of the lone candidates (name -> weight bytes) heavy enough to be blocks.

    Args:
        lone: each candidate: the single module of a list, by its block name and weight bytes.
        repeated_block_bytes: weight bytes of every block found in lists of two or more.
        model_bytes: weight bytes of the whole model.
    """
    if repeated_block_bytes:
        threshold = _median(repeated_block_bytes) * LONE_MIN_SHARE_OF_MEDIAN_BLOCK
    else:
        threshold = model_bytes * LONE_MIN_SHARE_OF_MODEL
    return {name for name, nbytes in lone.items() if nbytes > 0 and nbytes >= threshold}


def _median(values: Sequence[int]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
