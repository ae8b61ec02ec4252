"""Memory inventory: reserves, the pinned-RAM budget and container limits."""

import distorch.memory as memory
from distorch.memory import DeviceMemory, MemoryInventory, safe_pinned_bytes
from distorch.units import GIB


def test_reserves_follow_device_kind():
    gpu = DeviceMemory("cuda:0", 20 * GIB, 24 * GIB)
    ram = DeviceMemory("cpu", 60 * GIB, 64 * GIB)
    assert gpu.usable == 20 * GIB - int(memory.GPU_RESERVE_FIXED + 0.05 * 24 * GIB)
    assert ram.usable == 60 * GIB - int(memory.RAM_RESERVE_FIXED + 0.10 * 64 * GIB)
    assert DeviceMemory("cuda:0", 0, 8 * GIB).usable == 0


def test_pinned_budget_linux_and_windows(monkeypatch):
    monkeypatch.setattr(memory.sys, "platform", "linux")
    assert safe_pinned_bytes(64 * GIB, 0) == 48 * GIB  # min(0.9·64, 64-4, 64+0-16) = 48
    assert safe_pinned_bytes(16 * GIB, 0) == int(0.4 * 16 * GIB)  # small machines keep the 40% floor
    assert safe_pinned_bytes(64 * GIB, 32 * GIB) == int(0.9 * 64 * GIB)
    monkeypatch.setattr(memory.sys, "platform", "win32")
    assert safe_pinned_bytes(64 * GIB, 0) == int(0.4 * 64 * GIB)


def test_from_free_bytes_with_pinned_key():
    inventory = MemoryInventory.from_free_bytes({"cuda:0": 8 * GIB, "cpu": 32 * GIB, "pinned": 5 * GIB})
    assert inventory.pinned_budget == 5 * GIB
    assert set(inventory.devices) == {"cuda:0", "cpu"}


def test_cgroup_limit_clamps_ram(monkeypatch, tmp_path):
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text(str(8 * GIB))
    usage.write_text(str(3 * GIB))
    monkeypatch.setattr(memory, "_CGROUP_LIMIT_FILES", (str(limit),))
    monkeypatch.setattr(memory, "_CGROUP_USAGE_FILES", (str(usage),))
    ram = memory._probe_ram()
    assert ram.total == 8 * GIB
    assert ram.free <= 5 * GIB


def test_unlimited_cgroup_is_ignored(monkeypatch, tmp_path):
    limit = tmp_path / "memory.max"
    limit.write_text("max")
    monkeypatch.setattr(memory, "_CGROUP_LIMIT_FILES", (str(limit),))
    ram = memory._probe_ram()
    assert ram.total == memory.psutil.virtual_memory().total
