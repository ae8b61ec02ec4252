"""Finds the repeated transformer blocks of any torch model and what their weights occupy.

A block is a child of a ModuleList/Sequential whose children repeat (two or more non-leaf modules of
one class holding weights): `blocks`, `double_blocks`/`single_blocks`, `joint_blocks`,
`transformer_blocks`, a text encoder's `encoder.layers`/`encoder.block`. A list holding a single
module (a 1+1-block Flux) is a block list too when that module is as heavy as a block (lone_blocks.py).
Lists nested inside a block belong to that block. Everything outside the blocks is the resident "rest".

Sizes are measured on storage, not on tensor shapes: a quantized GGUF tensor counts its bytes, and
tensors that share memory (tied weights, views) are grouped into one `TensorCluster` that is counted
and moved once. A cluster used by two blocks, or by a block and the rest, stays resident.

A layout describes weights (names, offsets, sizes, dtypes, strides) and never holds their storage: the
bytes are wherever the model's tensors point now (`live_bytes`), so staging a block into a buffer and
re-pointing its tensors leaves nothing that keeps the original memory alive.
"""

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .files import Backing, FileIdentity, FileSpan, MappedFiles
from .lone_blocks import accepted_lone_blocks
from .pages import MappingTable
from .units import dtype_label

_CONTAINERS = (nn.ModuleList, nn.Sequential)
_BARE_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)  # exact types: subclasses are real modules


@dataclass(frozen=True)
class TensorView:
    """How one parameter or buffer sits inside its cluster: its names and layout, never its bytes."""

    names: tuple[str, ...]  # every dotted name the tensor has in the model (a tie gives several)
    offset: int  # bytes from the start of the cluster
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]

    def rebuild_on(self, flat: torch.Tensor, byte_offset: int) -> torch.Tensor:
        """This tensor's dtype, size and strides as a view of the uint8 buffer `flat`, `byte_offset` bytes in."""
        start = flat.storage_offset() + byte_offset
        typed = torch.empty(0, dtype=self.dtype, device=flat.device)
        return typed.set_(flat.untyped_storage(), start // self.dtype.itemsize, self.size, self.stride)


@dataclass(frozen=True)
class TensorCluster:
    """A byte range holding one tensor, or several that overlap (ties, views): described, not held.

    The bytes are wherever the member tensors point now (`live_bytes`); `device`, `backing` and `source` say where
    they were when the model was discovered, so that `close()` can put them back there and every read from a model
    file can check it is still the file discovered.
    """

    device: str  # "cpu" or "cuda:N" at discovery
    nbytes: int
    views: tuple[TensorView, ...]  # the first one starts the range (offset 0)
    owners: frozenset[str | None]
    backing: Backing = Backing.RAM  # what held the host bytes at discovery (files.MappedFiles)
    source: FileSpan | None = None  # where they lay in a model file that can be read through a descriptor

    @property
    def file_backed(self) -> bool:
        """The bytes lay in a file on a disk: they may stay there and be read on demand (the disk tier)."""
        return self.backing is Backing.FILE


@dataclass(frozen=True)
class Block:
    """One repeated block: its dotted name, weight bytes and exclusive clusters."""

    name: str
    order: int
    nbytes: int
    clusters: tuple[TensorCluster, ...]
    root: str

    @property
    def file_backed(self) -> bool:
        """All its bytes lie in a file mapping: it can stay there and be streamed from the file (disk tier)."""
        return bool(self.clusters) and all(c.file_backed for c in self.clusters)

    @property
    def ram_bytes(self) -> int:
        """Bytes in ordinary (anonymous) RAM: staging them into RAM moves them and adds nothing."""
        return sum(c.nbytes for c in self.clusters if c.device == "cpu" and c.backing is Backing.RAM)

    @property
    def file_bytes(self) -> int:
        return sum(c.nbytes for c in self.clusters if c.file_backed)

    @property
    def shared_ram_bytes(self) -> int:
        """Bytes in memory a mapping keeps (tmpfs, memfd, a deleted file): staging copies them, adding their bytes."""
        return sum(c.nbytes for c in self.clusters if c.backing is Backing.SHARED)


@dataclass(frozen=True)
class ModelLayout:
    """The blocks in registration order and the weights outside them."""

    blocks: tuple[Block, ...]
    rest: tuple[TensorCluster, ...]
    # Weights held by tensor subclasses without storage of their own (ComfyUI 0.8+'s QuantizedTensor: fp8-scaled and
    # mixed-precision files): their bytes, and the blocks left out for holding one (the host places those).
    opaque_bytes: int = 0
    opaque_blocks: tuple[str, ...] = ()

    @property
    def block_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    @property
    def rest_bytes(self) -> int:
        """Weights outside the streamable blocks: clusters and opaque tensors alike."""
        return sum(c.nbytes for c in self.rest) + self.opaque_bytes

    @property
    def total_bytes(self) -> int:
        return self.block_bytes + self.rest_bytes

    def block(self, name: str) -> Block:
        for block in self.blocks:
            if block.name == name:
                return block
        raise KeyError(f"no block named {name!r}")

    @property
    def files(self) -> tuple[FileIdentity, ...]:
        """The model files its weights lie in, as discovered."""
        clusters = [c for b in self.blocks for c in b.clusters] + list(self.rest)
        return tuple(dict.fromkeys(c.source.file for c in clusters if c.source is not None))

    def bytes_on(self, device: str) -> int:
        """Bytes of the model's weights currently stored on `device` (e.g. already loaded there)."""
        clusters = [c for b in self.blocks for c in b.clusters] + list(self.rest)
        return sum(c.nbytes for c in clusters if c.device == device)


def tensor_at(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter or buffer called `name` (dotted, relative to `module`)."""
    owner_name, _, attribute = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    tensor = owner._parameters.get(attribute)
    if tensor is None:
        tensor = owner._buffers.get(attribute)
    if tensor is None:
        raise RuntimeError(f"distorch: the model has no weight {name!r} any more; plan it again")
    return tensor


def cluster_tensors(module: nn.Module, cluster: TensorCluster, prefix: str = "") -> list[torch.Tensor]:
    """The live tensor of each view of `cluster`, looked up by name below `module` (names minus `prefix`)."""
    return [tensor_at(module, view.names[0][len(prefix):]) for view in cluster.views]


def live_bytes(cluster: TensorCluster, tensors: list[torch.Tensor]) -> torch.Tensor:
    """The cluster's bytes where its tensors point now, as a flat uint8 view (no copy).

    Raises RuntimeError when the tensors no longer sit together as discovered (something re-pointed one).
    """
    anchor = tensors[0]
    storage = anchor.untyped_storage()
    start = anchor.storage_offset() * anchor.element_size() - cluster.views[0].offset
    for view, tensor in zip(cluster.views, tensors):
        moved = tensor.untyped_storage().data_ptr() != storage.data_ptr() or \
            tensor.storage_offset() * tensor.element_size() - view.offset != start
        if moved:
            raise RuntimeError(f"distorch: weight {view.names[0]!r} was moved apart from the weights it shares "
                               "memory with since the model was planned; plan it again")
    flat = torch.empty(0, dtype=torch.uint8, device=anchor.device)
    return flat.set_(storage, start, (cluster.nbytes,), (1,))


def point_into(cluster: TensorCluster, tensors: list[torch.Tensor], flat: torch.Tensor, byte_offset: int = 0) -> None:
    """Re-points every member tensor into `flat` (a copy of the cluster's bytes at `byte_offset`)."""
    for view, tensor in zip(cluster.views, tensors):
        tensor.data = view.rebuild_on(flat, byte_offset + view.offset)


def discover(model: nn.Module, planned_files: Iterable[FileIdentity] = ()) -> ModelLayout:
    """Finds the repeated blocks of `model` and groups all its weights into clusters.

    `planned_files`: the model files as an earlier discovery saw them (`Plan.files`); a file changed since keeps
    that identity, so reading it raises instead of reading the new bytes.

    Example:
        >>> layout = discover(my_dit)
        >>> [b.name for b in layout.blocks][:2]
        ['blocks.0', 'blocks.1']
    """
    block_modules = find_block_modules(model)
    roots = _outermost({parent for _, parent in block_modules.values()})
    clusters, opaque = _clusters(model, list(block_modules), planned_files)
    opaque_blocks = {owner for _, owners in opaque for owner in owners if owner is not None}
    by_owner = defaultdict(list)
    rest = []
    for cluster in clusters:
        owner = next(iter(cluster.owners)) if len(cluster.owners) == 1 else None
        if owner is not None and owner not in opaque_blocks:
            by_owner[owner].append(cluster)
        else:
            rest.append(cluster)
    blocks = tuple(
        Block(name, order, sum(c.nbytes for c in by_owner[name]), tuple(by_owner[name]),
              _root_of(parent, roots))
        for order, (name, (_, parent)) in enumerate(block_modules.items()) if name not in opaque_blocks
    )
    return ModelLayout(blocks, tuple(rest), sum(nbytes for nbytes, _ in opaque),
                       tuple(name for name in block_modules if name in opaque_blocks))


def find_block_modules(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Block name → (module, name of the module that owns its list), in registration order."""
    repeated = _repeated_lists(model)
    lone = _lone_candidates(model, repeated)
    repeated_bytes = [_module_bytes(child) for container in repeated.values()
                      for _, child in _weighted_children(container)]
    accepted = accepted_lone_blocks({block: _module_bytes(child) for block, (_, child) in lone.items()},
                                    repeated_bytes, _module_bytes(model))
    lists = dict(repeated)
    lists.update((list_name, container) for block, (list_name, container) in lone.items() if block in accepted)
    found: dict[str, tuple[nn.Module, str]] = {}
    for name, _ in model.named_modules():
        if name in lists:
            for child_name, child in _weighted_children(lists[name]):
                found[f"{name}.{child_name}" if name else child_name] = (child, name.rpartition(".")[0])
    return found


def _repeated_lists(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost containers whose children repeat (lists nested in their blocks belong to those blocks)."""
    lists: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(_is_within(name, outer) for outer in lists):
            continue
        if isinstance(module, _CONTAINERS) and _is_repeated(module):
            lists[name] = module
    return lists


def _lone_candidates(model: nn.Module, repeated: dict[str, nn.Module]) -> dict[str, tuple[str, nn.Module]]:
    """Lists holding exactly one module that is neither a plain layer nor a bare container, outside the
    repeated lists and holding none of them; the outermost of nested ones. Block name → (list name, list)."""
    found: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, _CONTAINERS):
            continue
        if any(_is_within(name, r) or _is_within(r, name) for r in repeated):
            continue  # inside a repeated list, or holding one: its blocks are the repeated ones
        if any(_is_within(name, block) for block in found):
            continue  # inside an outer lone block
        children = _weighted_children(module)
        if len(children) != 1:
            continue
        child_name, child = children[0]
        if type(child) in _BARE_CONTAINERS or not any(True for _ in child.children()):
            continue
        found[f"{name}.{child_name}" if name else child_name] = (name, module)
    return found


def _is_within(name: str, outer: str) -> bool:
    """`name` is `outer` or a module inside it ('' is the model itself)."""
    return outer == "" or name == outer or name.startswith(outer + ".")


def _weighted_children(container: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, c) for n, c in container.named_children() if _holds_weights(c)]


def _module_bytes(module: nn.Module) -> int:
    """Weight bytes of a module, each tensor once (an estimate for the lone-block rule, not for planning)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _is_repeated(container: nn.Module) -> bool:
    counts = defaultdict(int)
    for child in container.children():
        if _holds_weights(child) and any(True for _ in child.children()):
            counts[type(child)] += 1
    return any(n >= 2 for n in counts.values())


def _holds_weights(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _outermost(parents: set[str]) -> list[str]:
    """The owners of block lists that are not nested in another owner: one streaming pass each."""
    return sorted(p for p in parents if not any(_is_inside(p, q) for q in parents if q != p))


def _is_inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def _root_of(parent: str, roots: list[str]) -> str:
    return next(r for r in roots if r == parent or _is_inside(parent, r))


def _owner(tensor_name: str, blocks: set[str]) -> str | None:
    parts = tensor_name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in blocks:
            return prefix
    return None


def _named_tensors(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _clusters(model: nn.Module, block_names: list[str], planned_files: Iterable[FileIdentity]
              ) -> tuple[list[TensorCluster], list[tuple[int, set]]]:
    """Groups every parameter and buffer by overlapping byte ranges of the same storage; tensors without a storage
    of their own (wrapper subclasses) come back apart, as (bytes, owners): nothing can view or copy them as bytes."""
    blocks = set(block_names)
    tensors: dict[int, tuple[torch.Tensor, list[str], set]] = {}
    for name, tensor in _named_tensors(model):
        if tensor is None or tensor.device.type == "meta":
            continue
        entry = tensors.setdefault(id(tensor), (tensor, [], set()))
        entry[1].append(name)
        entry[2].add(_owner(name, blocks))
    by_storage = defaultdict(list)
    clusters, opaque = [], []
    mappings = MappedFiles(MappingTable.read(), planned_files)
    for tensor, names, owners in tensors.values():
        if is_traceable_wrapper_subclass(tensor):
            opaque.append((_wrapped_nbytes(tensor), owners))
            continue
        span = _Span(*_span(tensor), tensor, tuple(names), owners)
        if span.start == span.end:
            # Empty tensors have no bytes to stream; they stay with the resident rest.
            clusters.append(_make_cluster([span], 0, mappings, force_resident=True))
            continue
        by_storage[(str(tensor.device), tensor.untyped_storage().data_ptr())].append(span)
    for (_, address), spans in by_storage.items():
        for group in _overlapping_groups(spans):
            clusters.append(_make_cluster(group, address, mappings))
    return clusters, opaque


def _wrapped_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of the plain tensors a wrapper subclass holds (ComfyUI's QuantizedTensor: its data and scales)."""
    names, _ = tensor.__tensor_flatten__()
    inner = [getattr(tensor, name) for name in names]
    return sum(_wrapped_nbytes(t) if is_traceable_wrapper_subclass(t) else t.nbytes for t in inner)


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    tensor: torch.Tensor
    names: tuple[str, ...]
    owners: set


def _overlapping_groups(spans: list[_Span]) -> list[list[_Span]]:
    groups: list[list[_Span]] = []
    group_end = 0
    for span in sorted(spans, key=lambda s: s.start):
        if groups and span.start < group_end:
            groups[-1].append(span)
            group_end = max(group_end, span.end)
        else:
            groups.append([span])
            group_end = span.end
    return groups


def _make_cluster(group: list[_Span], storage_address: int, mappings: MappedFiles,
                  force_resident: bool = False) -> TensorCluster:
    start = group[0].start
    end = max(s.end for s in group)
    views = tuple(
        TensorView(s.names, s.start - start, s.tensor.dtype, s.tensor.size(), tuple(s.tensor.stride()))
        for s in group
    )
    owners = frozenset().union(*(s.owners for s in group))
    misaligned = any(v.offset % v.dtype.itemsize for v in views)
    if force_resident or misaligned:
        # A misaligned member cannot be rebuilt as a typed view in another buffer: keep it resident.
        owners = owners | {None}
    device = device_name(group[0].tensor.device)
    backing, source = mappings.locate(storage_address + start, end - start) if device == "cpu" else (Backing.RAM, None)
    return TensorCluster(device, end - start, views, owners, backing, source)


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) of `tensor` inside its storage, honouring strides (incl. expanded dims)."""
    itemsize = tensor.element_size()
    start = tensor.storage_offset() * itemsize
    if tensor.numel() == 0:
        return start, start
    extent = 1 + sum((n - 1) * s for n, s in zip(tensor.size(), tensor.stride()))
    return start, start + extent * itemsize


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes per weight format ('bf16', 'Q8_0', ...) of the model's parameters and buffers, each tensor once."""
    totals: dict[str, int] = defaultdict(int)
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for tensor in tensors.values():
        # Quantized GGUF tensors are uint8 storage; their subclass names the real format.
        label = dtype_label(getattr(tensor, "qtype_name", None) or str(tensor.dtype))
        totals[label] += tensor.numel() * tensor.element_size()
    return dict(totals)


def device_name(device: torch.device) -> str:
    """'cuda:N' or 'cpu': the spelling plans and inventories use."""
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return device.type
