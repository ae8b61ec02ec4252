"""The ledger: one process-wide record of the memory every DisTorch model holds or has reserved.

A plan reserves its placement here under the model it was made for (`distorch.plan`), so the next model's
plan sees it before the first one has staged a byte: two 14B models, a text encoder and a VAE in one
workflow plan against what the others left. The streamer marks an entry staged once its buffers exist;
from then on a fresh memory probe already sees those bytes, and only the pinned budget (a cap, not a
probe) keeps counting them. An entry leaves when its model is freed (a weakref finalizer) or when
`distorch.stream`'s handle is closed.

Imports neither torch nor ComfyUI: the planner uses it when planning from a file header.
"""

import threading
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Holding:
    """What one model's placement holds, or has reserved, outside its compute device (bytes)."""

    label: str  # the model's class name, for the report
    pinned: int = 0  # page-locked RAM of staged blocks
    pageable: int = 0  # ordinary RAM of staged blocks
    disk: int = 0  # blocks left in the model file's mapping, read on demand
    donor: tuple[tuple[str, int], ...] = ()  # (device, bytes) of blocks kept on donor GPUs
    ram_added: int = 0  # RAM the placement adds to what the model's weights already took (staging from a
    # file mapping or a GPU, CPU streaming slots)
    staged: bool = False  # True once the buffers exist (a memory probe sees them), False while only planned

    @property
    def host(self) -> int:
        return self.pinned + self.pageable

    @property
    def pending_ram(self) -> int:
        """RAM reserved but not allocated yet: what a fresh probe of free memory does not show."""
        return 0 if self.staged else self.ram_added

    def pending_on(self, device: str) -> int:
        """Donor-GPU bytes reserved on `device` but not allocated yet."""
        return 0 if self.staged else sum(n for d, n in self.donor if d == device)


class Account:
    """One model's entry, for the object that stages it: it updates the entry without knowing the model."""

    def __init__(self, ledger: "Ledger", key: int):
        self._ledger = ledger
        self._key = key

    def update(self, **changes) -> None:
        """Replaces fields of the entry (e.g. `staged=True, pinned=...` with the bytes actually pinned)."""
        self._ledger._update(self._key, changes)

    @property
    def holding(self) -> Holding | None:
        return self._ledger._holding(self._key)


class Ledger:
    """Holdings by model. Thread-safe, and safe from the garbage collector.

    A model's entry leaves when the model is freed, by a weakref finalizer. The cyclic GC runs finalizers (and
    `__del__` methods) at any allocation, also inside a ledger call on the same thread: a finalizer that took the
    lock waited for its own thread for good, and one that removed the entry changed the dict under an iteration.
    So finalizers only queue the freed key (a deque append, atomic), and every call, under the lock, first
    removes the queued entries; the lock is re-entrant, so a `__del__` that calls the ledger while the same
    thread holds the lock proceeds, and readers iterate a copy of the entries.
    """

    def __init__(self):
        self._entries: dict[int, Holding] = {}  # id(model) -> its holding
        self._finalizers: dict[int, weakref.finalize] = {}  # id(model) -> queues its key when the model dies
        self._freed: deque[int] = deque()  # keys of freed models whose entries are still to be removed
        self._lock = threading.RLock()

    def reserve(self, owner: object, holding: Holding) -> Account:
        """Records `holding` for `owner` (replacing its earlier entry) until `owner` is freed or released."""
        key = id(owner)
        with self._lock:
            self._forget_freed()  # first: a freed model's id may be `owner`'s now
            self._entries[key] = holding
            if key not in self._finalizers:
                self._finalizers[key] = weakref.finalize(owner, self._freed.append, key)
        return Account(self, key)

    def account(self, owner: object) -> Account | None:
        """The entry of `owner`, if it has one."""
        with self._lock:
            self._forget_freed()
            return Account(self, id(owner)) if id(owner) in self._entries else None

    def release(self, owner: object) -> None:
        """Removes `owner`'s entry now (its memory went back)."""
        key = id(owner)
        with self._lock:
            self._forget_freed()
            finalizer = self._finalizers.pop(key, None)
            self._entries.pop(key, None)
        if finalizer is not None:
            finalizer.detach()

    def others(self, owner: object | None = None) -> tuple[Holding, ...]:
        """Every entry except `owner`'s, in the order they were made."""
        with self._lock:
            self._forget_freed()
            entries = self._entries.copy()  # one C call: nothing runs while it copies
        return tuple(h for key, h in entries.items() if owner is None or key != id(owner))

    def holdings(self) -> tuple[Holding, ...]:
        return self.others(None)

    def _holding(self, key: int) -> Holding | None:
        with self._lock:
            self._forget_freed()
            return self._entries.get(key)

    def _update(self, key: int, changes: dict) -> None:
        with self._lock:
            self._forget_freed()
            if key in self._entries:
                self._entries[key] = replace(self._entries[key], **changes)

    def _forget_freed(self) -> None:
        """Removes the entries of models freed since the last call (the caller holds the lock). Allocates
        nothing, so no collection runs in it; a key leaves the queue only after its entry went."""
        while self._freed:
            key = self._freed[0]
            self._entries.pop(key, None)
            self._finalizers.pop(key, None)
            self._freed.popleft()


LEDGER = Ledger()  # the process-wide ledger every plan and stream uses unless given another


def total(holdings: Iterable[Holding], field: str) -> int:
    return sum(getattr(h, field) for h in holdings)
