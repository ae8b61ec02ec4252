"""city96/ComfyUI-GGUF, the GGUF pack most ComfyUI users run, unpacked at test time as an independent reference.

The snapshot lives in the shared folder beside the repository (`../shared/reference`, else
`/work/shared/reference`, as scripts/setup_comfyui.sh finds `../shared/comfyui`); it is never copied
into the repository. One call of it is adapted after unpacking, as its README allows: under numpy 2 its
`get_field` turns one-element arrays into Python numbers with `int(array)`, which numpy 2 refuses, so
every integer or boolean field (the UMT5 tokenizer's special ids and flags) would fail to load.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARBALL = "ComfyUI-GGUF-795e451.tar.gz"
PACK_DIR = "ComfyUI-GGUF"
_GET_FIELD_CALL = "return field_type(field.parts[field.data[-1]])"
_GET_FIELD_FIX = "return field_type(field.parts[field.data[-1]][0])  # numpy 2: index the one-element array"


def reference_tarball() -> Path | None:
    """The snapshot, or None when this checkout has no shared folder beside it."""
    shared = Path(os.environ.get("DISTORCH_SHARED", REPO.parent / "shared"))
    for folder in (shared / "reference", Path("/work/shared/reference")):
        if (folder / TARBALL).is_file():
            return folder / TARBALL
    return None


def unpack_reference(destination: Path) -> Path:
    """Unpacks the snapshot into `destination` and returns the pack directory (destination/ComfyUI-GGUF)."""
    tarball = reference_tarball()
    if tarball is None:
        raise FileNotFoundError(f"{TARBALL} not found in ../shared/reference or /work/shared/reference")
    with tarfile.open(tarball) as archive:
        archive.extractall(destination, filter="data")
    pack = destination / PACK_DIR
    loader = pack / "loader.py"
    source = loader.read_text()
    if source.count(_GET_FIELD_CALL) != 1:
        raise RuntimeError(f"{loader}: the get_field call this harness adapts has changed; review reference_pack.py")
    loader.write_text(source.replace(_GET_FIELD_CALL, _GET_FIELD_FIX))
    return pack
