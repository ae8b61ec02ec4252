"""The DisTorch nodes' table lives in `distorch/catalog.py` (pure data the workflow converter shares)."""

from ..distorch.catalog import (  # noqa: F401
    CHECKPOINT_INPUTS,
    DISTORCH_INPUTS,
    FILE_INPUTS,
    LATER_INPUTS,
    NODE_TITLES,
    OUTPUT_TYPES,
    output_type,
    output_types,
    widget_inputs,
)
