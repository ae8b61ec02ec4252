"""Staging reports its progress through a callback (the node pack drives ComfyUI's progress bar with it),
and a callback that raises (a user interrupt) cancels staging without leaving the model inconsistent."""

import pytest
import torch

import distorch
from distorch import BlockStreamer, CpuCopyEngine, discover
from distorch.streamer import StoragePlacement
from distorch.toy import make_toy_dit
from distorch.units import GIB

ROOMY = {"cpu": 64 * GIB, "pinned": 32 * GIB}


class Interrupted(Exception):
    pass


def streamer_for(model, share=1.0):
    layout = discover(model)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=share * layout.block_bytes / GIB, memory=ROOMY)
    blocks = [b for b in layout.blocks if b.name in plan.streamed]
    storage = {b.name: StoragePlacement("cpu") for b in blocks}
    return BlockStreamer(model, blocks, storage, "cpu", engine=CpuCopyEngine(deferred=True), debug=True), blocks


def run(model):
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    return model(x, torch.tensor([0.2, 0.9]))


def test_progress_counts_every_staged_byte_in_order():
    model = make_toy_dit(dim=32, depth=6, heads=2)
    streamer, blocks = streamer_for(model)
    calls = []
    streamer.open(progress=lambda done, total: calls.append((done, total)))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) == len(blocks) + 1
    assert [d for d, _ in calls] == sorted(d for d, _ in calls) and {t for _, t in calls} == {total}
    assert total == sum(b.nbytes for b in streamer._blocks)
    streamer.close(unstage=False)
    again = []
    streamer.open(progress=lambda done, total: again.append((done, total)))
    assert again == [], "blocks still staged from the last open are not staged (nor reported) again"
    streamer.close()


def test_an_interrupt_during_staging_leaves_the_model_usable_and_the_next_open_stages_the_rest():
    model = make_toy_dit(dim=32, depth=6, heads=2)
    expected = run(model)
    streamer, blocks = streamer_for(model)
    seen = []

    def interrupt_after_two(done, total):
        seen.append(done)
        if len(seen) == 3:  # the start, then two staged blocks
            raise Interrupted

    with pytest.raises(Interrupted):
        streamer.open(progress=interrupt_after_two)
    assert not streamer.is_open
    assert torch.equal(run(model), expected), "half-staged weights must still be the model's weights"
    resumed = []
    streamer.open(progress=lambda done, total: resumed.append((done, total)))
    assert resumed[-1][1] == sum(b.nbytes for b in streamer._blocks) - seen[-1], "only the rest is staged"
    assert torch.equal(run(model), expected) and torch.equal(run(model), expected)
    assert streamer.stats().copies > 0
    streamer.close()
    assert torch.equal(run(model), expected)
