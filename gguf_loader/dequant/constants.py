"""Lookup tables and small constant tensors, built once per device on first use.

Kernels ask for a table by name; the first request builds it on the CPU (from gguf-py's own tables,
so nothing is restated here) and copies it to the device once. Later calls are a dict lookup: no
host-to-device upload and no host synchronisation per dequantization call.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

Builder = Callable[[], torch.Tensor]


class ConstantCache:
    """Device-resident constants keyed by (table name, device)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}  # built tables, per device
        self._builders: dict[str, Builder] = {}  # how to build each named table on the CPU
        self._lock = threading.Lock()  # two threads dequantizing at once build a table only once

    def define(self, name: str, builder: Builder) -> None:
        """Declares how to build table `name`; defining a name twice is a programming error."""
        if name in self._builders:
            raise RuntimeError(f"constant table {name!r} is already defined")
        self._builders[name] = builder

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        """Table `name` on `device`, built and uploaded on first use."""
        table = self._tables.get((name, device))
        if table is None:
            table = self._build(name, device)
        return table

    def _build(self, name: str, device: torch.device) -> torch.Tensor:
        with self._lock:
            table = self._tables.get((name, device))
            if table is None:
                cpu = self._tables.get((name, torch.device("cpu")))
                if cpu is None:
                    cpu = self._builders[name]().contiguous()
                    self._tables[(name, torch.device("cpu"))] = cpu
                table = cpu if device.type == "cpu" else cpu.to(device)
                self._tables[(name, device)] = table
            return table

    def clear(self, device: torch.device | None = None) -> None:
        """Drops the cached tables (of one device, or all), e.g. before releasing a GPU."""
        with self._lock:
            for key in [k for k in self._tables if device is None or k[1] == device]:
                del self._tables[key]


CONSTANTS = ConstantCache()


def table(name: str, device: torch.device) -> torch.Tensor:
    """Shorthand for `CONSTANTS.get(name, device)`."""
    return CONSTANTS.get(name, device)


def define(name: str) -> Callable[[Builder], Builder]:
    """Decorator form of `CONSTANTS.define`."""

    def decorate(builder: Builder) -> Builder:
        CONSTANTS.define(name, builder)
        return builder

    return decorate
