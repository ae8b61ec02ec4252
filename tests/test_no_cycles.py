"""No reference cycles: a streamed model is freed by reference counting alone, with its buffers (issue #8).

ComfyUI drops a model when its loader's output leaves the cache; with a cycle (model -> state -> streamer ->
model, or module -> hook -> streamer -> module) it lives until a full garbage collection, core logs
"memory leak" and the pinned RAM stays registered meanwhile. Every test runs with the collector disabled.
"""

import gc
import weakref

import pytest
import torch
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState
from dit_models import make_quirky, sampling_run

import distorch
from distorch.ledger import LEDGER
from distorch.memory import MemoryInventory
from distorch.units import GIB

ROOMY = {"cpu": 64 * GIB}


@pytest.fixture(autouse=True)
def no_collector():
    gc.collect()
    gc.disable()
    yield
    gc.enable()


def inputs():
    return torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))


def half(model):
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=distorch.discover(model).block_bytes / 2 / GIB,
                         memory=ROOMY)


def test_model_is_freed_after_close():
    model = make_quirky()
    reference = weakref.ref(model)
    handle = distorch.stream(model, half(model))
    sampling_run(model, inputs(), steps=1)
    handle.close()
    del handle, model
    assert reference() is None


def test_model_dropped_while_streaming_takes_its_streamer_and_buffers():
    model = make_quirky()
    handle = distorch.stream(model, half(model))
    sampling_run(model, inputs(), steps=1)
    references = [weakref.ref(model), weakref.ref(handle.streamer)] + [weakref.ref(b) for b in handle.streamer._arenas]
    assert len(references) > 2
    entries = len(LEDGER.holdings())
    del handle, model
    assert all(r() is None for r in references), "model, streamer and staging buffers must go at once"
    assert len(LEDGER.holdings()) == entries - 1


@pytest.mark.parametrize("close_first", [True, False], ids=["closed", "open"])
def test_node_state_refers_to_no_model(close_first):
    """The state ComfyUI's patcher drives: attached to the model, staged across unloads (close(unstage=False))."""
    model = make_quirky()
    state = DisTorchState.attach(model, DisTorchSettings("cpu", distorch.discover(model).block_bytes / 2 / GIB, "cpu"),
                                 MemoryInventory.from_free_bytes(ROOMY))
    state.open(model)
    sampling_run(model, inputs(), steps=1)
    if close_first:
        state.close(unstage=False)
    references = [weakref.ref(model), weakref.ref(state.streamer)] + [weakref.ref(b) for b in state.streamer._arenas]
    del state, model
    assert all(r() is None for r in references)


def test_pinned_buffers_are_unregistered_the_moment_the_model_goes(monkeypatch):
    """cudaHostRegister/Unregister are recorded instead of called (no GPU needed): the model's state owns the
    streamer, and dropping the model must unpin every staging buffer at once, not at the next collection."""
    from distorch import hostbuf
    from distorch.streamer import BlockStreamer, StoragePlacement

    registered, unregistered = [], []
    monkeypatch.setattr(hostbuf, "_register", lambda tensor: registered.append(tensor.data_ptr()) or True)
    monkeypatch.setattr(hostbuf, "_unregister_storage", lambda storage: unregistered.append(storage.data_ptr()))
    model = make_quirky()
    blocks = distorch.discover(model).blocks[::2]
    placement = {b.name: StoragePlacement("cpu", pinned=True) for b in blocks}
    model.streaming_state = BlockStreamer(model, blocks, placement, "cpu").open()  # as nodes/state.py holds it
    sampling_run(model, inputs(), steps=1)
    assert len(registered) == len(blocks) and not unregistered
    del model
    assert sorted(unregistered) == sorted(registered)
