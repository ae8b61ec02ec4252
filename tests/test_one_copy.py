"""One host copy: staging moves a streamed block's bytes into its buffer and frees the original (issue #8).

Measured as the process's RSS (after a collection and malloc_trim) once streaming has started, against the
RSS of the same model, fully faulted in, before: the growth may be the streaming slots (CPU compute: they
are RAM) plus 15 % of the streamed bytes. Before the fix the growth was the streamed bytes themselves (the
block records kept every source storage alive). Sources: a safetensors file copied into RAM (as ComfyUI
loads one) and a GGUF file left in its mapping (as the DisTorch GGUF loader does; its staged pages are
dropped from the mapping).
"""

import pytest
import torch
from memory_models import SOURCES, forward, load_model, rss, touch, write_model

import distorch
from distorch.toy import make_toy_dit
from distorch.units import GIB

MIB = 1 << 20
NOISE = 8 * MIB  # allocator and interpreter jitter between two readings
# ~185 MB in RAM (float32) and ~250 MB in its file (F16/Q8_0 Linear weights)
SHAPES = {"safetensors": (576, 12), "gguf": (1024, 12)}
ROOMY = {"cpu": 64 * GIB}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("one_copy")
    return {kind: write_model(kind, directory / f"model.{kind}", *SHAPES[kind]) for kind in SOURCES}


@pytest.fixture(scope="module")
def expected(files):
    """Each model's output, resident: the streamed forwards must match it exactly."""
    return {kind: forward(load_model(kind, files[kind], *SHAPES[kind])) for kind in SOURCES}


@pytest.fixture(scope="module", autouse=True)
def warm_up():
    """The first stream in a process imports torch._dynamo (hooks are compiler-disabled): ~70 MB that is no copy."""
    model = make_toy_dit(dim=32, depth=2, heads=2)
    plan = distorch.plan(model, compute_device="cpu", virtual_vram_gb=1e-6, memory=ROOMY)
    with distorch.stream(model, plan), torch.inference_mode():
        model(torch.randn(1, 4, 16), torch.tensor([1.0]))


def open_model(kind, files):
    model = load_model(kind, files[kind], *SHAPES[kind])
    touch(model)
    return model


def plan_share(model, share):
    target = share * distorch.discover(model).block_bytes
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=target / GIB, memory=ROOMY)


def allowed_growth(*plans) -> int:
    return sum(int(0.15 * p.streamed_bytes) + p.prefetch * p.slot_bytes for p in plans) + NOISE


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_streaming_keeps_one_copy(files, expected, kind, share):
    """0 % is the control (nothing staged); at 50 % and 100 % a kept source would add the streamed bytes."""
    model = open_model(kind, files)
    before = rss()
    plan = plan_share(model, share)
    assert bool(plan.streamed) == (share > 0)
    with distorch.stream(model, plan):
        got = forward(model)
        growth = rss() - before
    assert growth <= allowed_growth(plan), (f"RSS grew {growth / MIB:.1f} MiB with {plan.streamed_bytes / MIB:.1f} "
                                            f"MiB streamed (allowed {allowed_growth(plan) / MIB:.1f})")
    assert torch.equal(expected[kind], got)


@pytest.mark.parametrize("kind", SOURCES)
def test_two_models_keep_one_copy_each(files, kind):
    first, second = open_model(kind, files), open_model(kind, files)
    before = rss()
    plans = [plan_share(first, 0.5), plan_share(second, 0.5)]
    with distorch.stream(first, plans[0]), distorch.stream(second, plans[1]):
        forward(first), forward(second)
        growth = rss() - before
    assert growth <= allowed_growth(*plans), f"RSS grew {growth / MIB:.1f} MiB for two models"


@pytest.mark.parametrize("kind", SOURCES)
def test_close_then_reopen_keeps_one_copy(files, expected, kind):
    """close() gives the weights back from the staged bytes; streaming again moves them once more."""
    model = open_model(kind, files)
    before = rss()
    plan = plan_share(model, 0.5)
    distorch.stream(model, plan).close()
    closed = rss() - before
    with distorch.stream(model, plan):
        got = forward(model)
        growth = rss() - before
    assert closed <= int(0.15 * plan.streamed_bytes) + NOISE, f"RSS grew {closed / MIB:.1f} MiB after close()"
    assert growth <= allowed_growth(plan), f"RSS grew {growth / MIB:.1f} MiB after reopening"
    assert torch.equal(expected[kind], got)


@pytest.mark.cuda
def test_weights_already_on_the_gpu_leave_it_when_streamed():
    """A model core already placed on the compute GPU: staging copies the streamed blocks to RAM and frees them
    there, and close() puts them back."""
    model = make_toy_dit(dim=512, depth=12, heads=8).to("cuda:0")
    x, t = torch.randn(1, 16, 16, device="cuda:0"), torch.tensor([500.0], device="cuda:0")
    with torch.inference_mode():
        expected = model(x, t)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    plan = distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=distorch.discover(model).block_bytes / 2 / GIB,
                         memory={"cuda:0": 64 * GIB, "cpu": 64 * GIB})
    with distorch.stream(model, plan), torch.inference_mode():
        got = model(x, t)
        torch.cuda.synchronize()
        allocated = torch.cuda.memory_allocated()
        assert all(p.device.type == "cpu" for n, p in model.named_parameters()
                   if n.rpartition(".")[0].rpartition(".")[0] in plan.streamed)
    assert allocated <= before - plan.streamed_bytes + plan.prefetch * plan.slot_bytes + 8 * MIB
    assert torch.equal(expected, got)
    assert all(p.device.type == "cuda" for p in model.parameters())


@pytest.mark.cuda
def test_resident_weights_leave_ram_when_moved_to_the_gpu(files):
    model = open_model("safetensors", files)
    before = rss()
    plan = distorch.plan(model, compute_device="cuda:0", virtual_vram_gb=distorch.discover(model).block_bytes / 2 / GIB,
                         memory={"cuda:0": 64 * GIB, "cpu": 64 * GIB})
    with distorch.stream(model, plan):
        growth = rss() - before
    assert growth <= -0.85 * plan.resident_bytes + NOISE, "the resident weights' RAM copy must be freed"
