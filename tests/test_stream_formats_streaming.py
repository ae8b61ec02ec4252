"""Streaming in a stream format (issue 20, phase 2): blocks staged, held and copied as Q8_0 or fp8, decoded on the
compute device before they run.

The reference is the resident model with the format's values (tests/stream_reference.py): the format changes values
once, at staging, and streaming must add nothing, bit for bit, whatever the prefetch and the copy engine's timing.
Bytes and RSS are checked against the plan (a kept bf16 source would show), the planner counts the smaller blocks,
a block never runs on another block's decoded bytes, and `close()` gives the stored weights back: re-read from the
model file, or the format's values for a model built in memory.
"""

import dataclasses
import logging
import math

import pytest
import torch
from dit_models import make_quirky, sampling_run
from memory_models import rss, touch
from safetensors.torch import load_file, save_file
from stream_reference import with_format_values

import distorch
from distorch import CpuCopyEngine, Placement, PlacementRequest, PlanError, Tier
from distorch import streamer as streamer_module
from distorch.budget import ComputeBudget
from distorch.ledger import Ledger
from distorch.lowrank import LowRankTerm, SidePaths, layer_geometry, stack_terms
from distorch.memory import RAM_RESERVE_FIXED, RAM_RESERVE_SHARE, DeviceMemory, MemoryInventory
from distorch.planner import ModelSizes, plan_request
from distorch.report import plan_to_dict
from distorch.stream_format import BlockCodec
from distorch.toy import ToyDiT, make_toy_dit
from distorch.units import GIB

MIB = 1 << 20
NOISE = 8 * MIB  # allocator and interpreter jitter between two readings
ROOMY = {"cpu": 64 * GIB}
FORMATS = ("q8_0", "fp8_e4m3fn")
RUN = dict(steps=2, cfg=True, skip_pattern=(False, True))
# Output error of a whole forward against the stored model's (relative, Frobenius), on random-weight models: Q8_0
# keeps ~0.4 % per weight and the issue asks 1 %; fp8's 3-bit mantissa costs ~2.5 % per weight (phase 1 measured up
# to 2.65 % at the output), so 3 %. Per weight: the codec's own error (docs/stream_formats.md).
OUTPUT_TOLERANCE = {"q8_0": 0.01, "fp8_e4m3fn": 0.03}
WEIGHT_TOLERANCE = {"q8_0": 0.006, "fp8_e4m3fn": 0.03}


def share_plan(model, share: float, fmt: str = "stored", ledger: Ledger | None = None, memory=None, **options):
    gb = share * distorch.discover(model).block_bytes / GIB
    return distorch.plan(model, compute_device="cpu", virtual_vram_gb=gb, memory=memory or ROOMY,
                         stream_format=fmt, ledger=ledger or Ledger(), **options)


def inputs():
    return torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(1))


def reference(make, plan, fmt):
    """A fresh model of the same seed, resident, with the format's values in the weights `plan` encodes."""
    model = make()
    with_format_values(model, plan.streamed, fmt)
    return model


def bf16_toy(dim: int = 256, depth: int = 6) -> ToyDiT:
    return make_toy_dit(dim=dim, depth=depth, heads=4, dtype=torch.bfloat16)


def bf16_forward(model) -> torch.Tensor:
    x = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # the toy embeds time in float32
        return model(x, torch.tensor([500.0]))


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def encoded_weights(placement) -> dict[str, torch.Tensor]:
    """Name -> the model's tensor of every weight staged encoded."""
    model = placement.model
    names = [coding.name for b in placement.streamer._blocks if b.codec is not None for coding in b.codec.encoded]
    return {name: model.get_parameter(name) for name in names}


# -- bytes: the plan, the buffers, the slots, the report ------------------------------------------------------------

@pytest.mark.parametrize("fmt, ratio", [("q8_0", 0.56), ("fp8_e4m3fn", 0.51)])
def test_the_plan_and_the_buffers_hold_the_smaller_blocks(fmt, ratio):
    """`plan.streamed_bytes` is the encoded size (the issue's check: <= 0.56 x as stored for q8_0), and the streamer
    holds exactly that: each host buffer, the ledger entry, slots of the largest encoded block, one decode buffer of
    the largest block as stored; the report and the node's plan view show the format and the bytes saved."""
    model = bf16_toy(dim=512, depth=4)
    stored = share_plan(model, 1.0)
    plan = share_plan(model, 1.0, fmt)
    assert plan.streamed_stored_bytes == stored.streamed_bytes and plan.streamed == stored.streamed
    assert plan.streamed_bytes <= ratio * stored.streamed_bytes
    assert plan.saved_bytes == stored.streamed_bytes - plan.streamed_bytes
    assert plan.slot_bytes == max(b.encoded_nbytes for b in plan.blocks if b.streamed) < stored.slot_bytes
    assert plan.decode_bytes > stored.slot_bytes and stored.decode_bytes == 0
    assert plan.compute_bytes == plan.resident_bytes + plan.prefetch * plan.slot_bytes + plan.decode_bytes
    ledger = Ledger()
    with distorch.stream(model, plan, engine=CpuCopyEngine(deferred=True), ledger=ledger) as handle:
        bf16_forward(model)
        streamer = handle.streamer
        assert sum(b.buffer.nbytes for b in streamer._blocks) == plan.streamed_bytes
        assert [s.buffer.numel() for s in streamer._slots] == [plan.slot_bytes] * plan.prefetch
        assert streamer._decode.buffer.numel() == max(b.nbytes for b in plan.blocks if b.decodes)
        assert ledger.holdings()[0].pageable == plan.streamed_bytes
        assert handle.stats().bytes_copied == handle.stats().copies * plan.slot_bytes  # each copy: a block encoded
    report = plan.report()
    assert f"stream format {fmt}: 4 streamed blocks held and copied as" in report and "(saves " in report
    view = plan_to_dict(plan)
    assert view["stream_format"] == fmt and view["totals"]["saved_bytes"] == plan.saved_bytes
    assert {b["format"] for b in view["blocks"]} == {fmt}
    assert sum(b["stream_bytes"] for b in view["blocks"]) == plan.streamed_bytes
    assert view["totals"]["per_pass_bytes"] == plan.streamed_bytes
    assert view["totals"]["decode_bytes"] == plan.decode_bytes


def ram_free(usable: int, total: int = 8 * GIB) -> int:
    """Free RAM that leaves `usable` bytes after the planner's safety reserve."""
    return usable + int(RAM_RESERVE_FIXED + RAM_RESERVE_SHARE * total)


def test_the_planner_fits_more_blocks_in_ram_pinned_ram_and_a_donor_when_they_are_smaller():
    """A model on the GPU whose blocks must be staged into RAM that holds 60 % of them as stored: stored does not
    fit, q8_0 does; a pinned budget of 60 % pins every q8_0 block; a donor GPU of 60 % takes them all."""
    block, n = 100 * MIB, 10
    sizes = ModelSizes("M", tuple((f"blocks.{i}", block) for i in range(n)), 10 * MIB,
                       bytes_on={"cuda:0": n * block + 10 * MIB},
                       encoded={"q8_0": {f"blocks.{i}": (53 * MIB, 4 * MIB) for i in range(n)}})
    short_ram = MemoryInventory({"cuda:0": DeviceMemory("cuda:0", 4 * GIB, 4 * GIB),
                                 "cpu": DeviceMemory("cpu", ram_free(int(0.6 * n * block)), 8 * GIB)},
                                pinned_budget=int(0.6 * n * block))
    request = PlacementRequest("cuda:0", n * block / GIB)
    with pytest.raises(PlanError, match="need room on cpu"):
        plan_request(sizes, request, memory=short_ram)
    plan = plan_request(sizes, dataclasses.replace(request, stream_format="q8_0"), memory=short_ram)
    assert all(b.tier is Tier.PINNED and b.decodes for b in plan.blocks)
    assert plan.ram_added == plan.pinned_bytes == n * 53 * MIB
    assert plan.decode_bytes == block + 4 * MIB and plan.slot_bytes == 53 * MIB
    donor = MemoryInventory({"cuda:0": DeviceMemory("cuda:0", 4 * GIB, 4 * GIB),
                             "cuda:1": DeviceMemory("cuda:1", int(0.6 * n * block) + int((0.25 + 0.05 * 24) * GIB),
                                                    24 * GIB),
                             "cpu": DeviceMemory("cpu", ram_free(0), 8 * GIB)})
    on_donor = PlacementRequest("cuda:0", n * block / GIB, "cuda:1", stream_format="q8_0")
    assert {b.tier for b in plan_request(sizes, on_donor, memory=donor).blocks} == {Tier.DONOR}
    with pytest.raises(PlanError):
        plan_request(sizes, dataclasses.replace(on_donor, stream_format="stored"), memory=donor)


def test_auto_placement_counts_encoded_slots_and_the_decode_buffer_against_the_run_budget():
    """A run budget in auto mode: the slots hold encoded blocks, the decode buffer one block as stored plus its
    scratch. Room for the rest + 6.5 blocks: q8_0 keeps 4 blocks resident (4 + 2 x 0.53 + 1.04 = 6.1; a fifth would
    make 7.1), as stored does (4 + 2 slots); both fit the budget. Encoded slots do not save VRAM at 2 slots (the
    decode buffer costs what they save): the formats save RAM and copies, the planner must not promise more."""
    block, n, rest = 100 * MIB, 10, 10 * MIB
    sizes = ModelSizes("M", tuple((f"blocks.{i}", block) for i in range(n)), rest,
                       bytes_on={"cpu": n * block + rest}, in_ram={f"blocks.{i}": block for i in range(n)},
                       encoded={"q8_0": {f"blocks.{i}": (53 * MIB, 4 * MIB) for i in range(n)}})
    machine = MemoryInventory({"cuda:0": DeviceMemory("cuda:0", 4 * GIB, 4 * GIB),
                               "cpu": DeviceMemory("cpu", ram_free(n * block), 8 * GIB)})
    budget = ComputeBudget(rest + 6 * block + block // 2, source="test")
    request = PlacementRequest("cuda:0", 0.0, auto=True)
    stored = plan_request(sizes, request, memory=machine, budget=budget)
    encoded = plan_request(sizes, dataclasses.replace(request, stream_format="q8_0"), memory=machine, budget=budget)
    for plan in (stored, encoded):
        assert plan.compute_bytes <= budget.room, plan.report()
    assert encoded.decode_bytes == block + 4 * MIB and encoded.slot_bytes == 53 * MIB
    assert encoded.compute_bytes == rest + 4 * block + 2 * 53 * MIB + block + 4 * MIB
    assert len(encoded.streamed) == len(stored.streamed) == 6, (encoded.report(), stored.report())


def test_a_format_that_is_not_offered_is_refused_in_one_line():
    with pytest.raises(PlanError, match="^stream_format 'q4_k' is not one of stored, q8_0, fp8_e4m3fn$"):
        share_plan(make_quirky(), 0.5, "q4_k")
    assert PlacementRequest.validate("cpu", 1, stream_format=" Q8_0 ").stream_format == "q8_0"


@pytest.fixture(scope="module")
def warm_up():
    """The first stream in a process imports torch._dynamo (hooks are compiler-disabled): ~70 MB that is no copy."""
    model = bf16_toy(dim=64, depth=2)
    with distorch.stream(model, share_plan(model, 1.0, "q8_0"), ledger=Ledger()):
        bf16_forward(model)


@pytest.mark.parametrize("fmt", ["stored", *FORMATS])
def test_host_memory_holds_the_encoded_blocks_and_not_the_bf16_source(fmt, warm_up):
    """The issue's check on a bf16 model built in RAM (~110 MB): once streaming runs, the process holds the resident
    bytes, 0.6 x the streamed bytes as stored (q8_0: 0.53, fp8: 0.50) and the slots and decode buffer, no more; a
    staging that kept the bf16 source would hold the streamed bytes as stored on top. "stored" is the control."""
    before = rss()
    model = bf16_toy(dim=768, depth=8)
    touch(model)
    plan = share_plan(model, 0.75, fmt)
    with distorch.stream(model, plan):
        bf16_forward(model)
        growth = rss() - before
    share = 1.0 if fmt == "stored" else 0.6
    allowed = (plan.resident_bytes + share * plan.streamed_stored_bytes + plan.prefetch * plan.slot_bytes
               + plan.decode_bytes + NOISE)
    assert growth <= allowed, (f"RSS grew {growth / MIB:.1f} MiB for {plan.resident_bytes / MIB:.1f} MiB resident and "
                               f"{plan.streamed_stored_bytes / MIB:.1f} MiB streamed (allowed {allowed / MIB:.1f})")


# -- values: streaming adds nothing to what the format changed --------------------------------------------------------

@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_equals_the_resident_model_with_the_formats_values_bit_for_bit(fmt, prefetch, deferred):
    """The quirky DiT (a block called twice, one skipped on alternate passes, ties, views, a transposed weight) with
    CFG, slots poisoned after use and a copy engine that lags the host."""
    model = make_quirky()
    plan = share_plan(model, 0.6, fmt)
    assert any(b.decodes for b in plan.blocks) and not all(b.streamed for b in plan.blocks)
    expected = sampling_run(reference(make_quirky, plan, fmt), inputs(), **RUN)
    with distorch.stream(model, plan, prefetch=prefetch, debug=True, engine=CpuCopyEngine(deferred=deferred),
                         ledger=Ledger()):
        got = sampling_run(model, inputs(), **RUN)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_against_the_stored_model_is_within_the_formats_bound(fmt):
    """bf16 weights: the output within the format's tolerance of the resident (stored) run, every encoded weight
    within its bound after close(), and streaming still exactly the format's values (a bf16 forward)."""
    stored_output = bf16_forward(bf16_toy())
    model = bf16_toy()
    plan = share_plan(model, 1.0, fmt)
    expected = bf16_forward(reference(bf16_toy, plan, fmt))
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger()) as handle:
        got = bf16_forward(model)
        names = list(encoded_weights(handle))
    assert torch.equal(got, expected)
    assert 0 < relative(got, stored_output) <= OUTPUT_TOLERANCE[fmt]
    original = bf16_toy()
    errors = [relative(model.get_parameter(n), original.get_parameter(n)) for n in names]
    assert names and max(errors) <= WEIGHT_TOLERANCE[fmt], max(errors)


def test_a_block_called_again_is_decoded_once_and_never_runs_on_another_blocks_bytes():
    """The decode buffer's tag: block 2, called twice in a row, is decoded once per forward; blocks called out of
    order (1, 3, 1) are decoded each time, and each computes what the reference block computes."""
    model = make_quirky()
    plan = share_plan(model, 1.0, "q8_0")
    expected_model = reference(make_quirky, plan, "q8_0")
    x, t = inputs(), torch.tensor([300.0, 20.0])
    with distorch.stream(model, plan, engine=CpuCopyEngine(deferred=True), ledger=Ledger()) as handle:
        assert torch.equal(model(x, t), expected_model(x, t))
        calls = len(plan.blocks) + 1  # block 2 twice
        assert handle.stats().decodes == calls - 1 and handle.stats().hits >= 1
        h, t_emb = torch.randn(2, 16, 64), expected_model.embed_time(t)
        for index in (1, 3, 1, 1):
            assert torch.equal(model.blocks[index](h, t_emb), expected_model.blocks[index](h, t_emb)), index
        assert handle.stats().decodes == calls - 1 + 3


def test_a_slot_is_free_again_while_its_encoded_block_runs():
    """The slot's free event is recorded right after the decode: while the block computes on the decode buffer no
    slot is held for it, so the next copy can start (with prefetch 1 the only slot already holds the next block)."""
    model = make_quirky()
    plan = share_plan(model, 1.0, "q8_0")
    seen = []
    with distorch.stream(model, plan, prefetch=1, engine=CpuCopyEngine(deferred=True), ledger=Ledger()) as handle:
        streamer = handle.streamer
        hook = model.blocks[3].register_forward_pre_hook(
            lambda module, args: seen.append(([s.users for s in streamer._slots], streamer._slots[0].block)))
        model(inputs(), torch.tensor([300.0, 20.0]))
        hook.remove()
    index = next(b.index for b in streamer._blocks if b.name == "blocks.3")
    assert seen == [([0], index + 1)], seen


class _Nesting(torch.nn.Module):
    """Two blocks, the first of which calls the second inside its own forward."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
                                          for _ in range(2))
        self.inner = [self.blocks[1]]  # a plain list: not a submodule of the first block
        self.blocks[0].register_forward_hook(lambda module, args, out: self.inner[0](out))

    def forward(self, x):
        return self.blocks[0](x)


def test_a_block_run_inside_another_streamed_blocks_forward_is_refused_clearly():
    model = _Nesting()
    plan = share_plan(model, 1.0, "q8_0")
    refused = "runs inside the forward of block 'blocks.0'.*stream this model as stored"
    with distorch.stream(model, plan, ledger=Ledger()), pytest.raises(RuntimeError, match=refused):
        model(torch.randn(2, 64))


# -- between forwards: placeholders; a closed streamer decodes on the host -------------------------------------------

def test_between_forwards_an_encoded_weight_is_a_nan_placeholder_of_its_shape():
    """No stored bytes exist between forwards: each encoded weight views one NaN element of its own (zero strides),
    with its dtype, shape and size as stored (ComfyUI's accounting); weights the format keeps view the host buffer."""
    model = bf16_toy()
    plan = share_plan(model, 1.0, "q8_0")
    with distorch.stream(model, plan, ledger=Ledger()) as handle:
        bf16_forward(model)
        weights = encoded_weights(handle)
        storages = {w.untyped_storage().data_ptr() for w in weights.values()}
        assert len(storages) == len(weights), "no two placeholders share a storage"
        for name, weight in weights.items():
            assert weight.dtype == torch.bfloat16 and set(weight.stride()) == {0} and weight.isnan().all(), name
            assert weight.untyped_storage().nbytes() == 2 and weight.nbytes == weight.numel() * 2
        kept = [t for b in handle.streamer._blocks for c, ts in zip(b.codec.codings, b.tensors) for t in ts
                if c.format == "stored"]
        hosts = [b.buffer.tensor.untyped_storage().data_ptr() for b in handle.streamer._blocks]
        assert kept and all(t.untyped_storage().data_ptr() in hosts for t in kept)
        assert all(v.isnan().all() for k, v in model.state_dict().items() if k in weights)


def test_a_paused_model_computes_its_encoded_blocks_decoded_on_the_host():
    """ComfyUI unloads a model between runs (close(unstage=False)): a forward then still computes the format's values,
    each block decoded for its call, and the weights view their placeholders again afterwards."""
    model = make_quirky()
    plan = share_plan(model, 0.6, "q8_0")
    expected = sampling_run(reference(make_quirky, plan, "q8_0"), inputs(), **RUN)
    placement = Placement.planned(model, PlacementRequest("cpu", plan.requested_offload / GIB,
                                                          stream_format="q8_0"),
                                  memory=ROOMY, ledger=Ledger(), engine=CpuCopyEngine(deferred=True))
    placement.open()
    placement.pause()
    assert not placement.streamer.is_open and not placement.streamer._slots
    for e, g in zip(expected, sampling_run(model, inputs(), **RUN), strict=True):
        assert torch.equal(e, g)
    assert all(w.isnan().all() for w in encoded_weights(placement).values())
    placement.release()
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


# -- close(): the stored weights come back ----------------------------------------------------------------------------

def test_close_gives_a_model_built_in_memory_the_formats_values():
    model = make_quirky()
    plan = share_plan(model, 0.6, "q8_0")
    expected = dict(reference(make_quirky, plan, "q8_0").named_parameters())
    handle = distorch.stream(model, plan, engine=CpuCopyEngine(deferred=True), ledger=Ledger())
    sampling_run(model, inputs(), **RUN)
    changed = list(encoded_weights(handle))
    handle.close()
    assert changed
    for name, weight in model.named_parameters():
        assert weight.device.type == "cpu" and torch.equal(weight, expected[name]), name


@pytest.fixture(scope="module")
def bf16_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("formats") / "toy_bf16.safetensors"
    save_file({k: v.contiguous() for k, v in bf16_toy().state_dict().items()}, str(path))
    return path


def mapped_model(path) -> ToyDiT:
    """The toy with the tensors of `path`'s mapping assigned (file-backed, as ComfyUI's mmap loads leave them)."""
    with torch.device("meta"):
        model = ToyDiT(256, 6, 4)
    model.load_state_dict(load_file(str(path)), assign=True)
    return model


def test_close_rereads_a_file_backed_model_from_its_file(bf16_file, caplog):
    """The weights come back as the file holds them (bf16, bit for bit), read through the checked descriptor; a file
    rewritten meanwhile is not read: the format's values come back instead, with a warning naming the file."""
    stored = load_file(str(bf16_file))
    model = mapped_model(bf16_file)
    plan = share_plan(model, 1.0, "q8_0")
    with distorch.stream(model, plan, ledger=Ledger()) as handle:
        bf16_forward(model)
        names = list(encoded_weights(handle))
    assert names
    for name, weight in model.state_dict().items():
        assert torch.equal(weight, stored[name]), name
    quantized = dict(reference(bf16_toy, plan, "q8_0").state_dict())  # the file's values: bf16_toy() was saved
    model = mapped_model(bf16_file)
    handle = distorch.stream(model, plan, ledger=Ledger())
    data = bytearray(bf16_file.read_bytes())
    bf16_file.write_bytes(bytes(data[:-2]) + bytes(reversed(data[-2:])))  # rewritten in place: new bytes, new mtime
    try:
        with caplog.at_level(logging.WARNING, logger="distorch.streamer"):
            handle.close()
    finally:
        bf16_file.write_bytes(bytes(data))
    assert str(bf16_file) in caplog.text and "gets its q8_0 values back instead" in caplog.text
    for name in names:
        assert torch.equal(model.get_parameter(name), quantized[name]), name


# -- LoRA on the decoded weight ---------------------------------------------------------------------------------------

def lora_terms(layer: torch.nn.Linear, seed: int) -> list[LowRankTerm]:
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(layer.out_features, 8, generator=generator).half() * 0.1
    down = torch.randn(8, layer.in_features, generator=generator).half() * 0.1
    return [LowRankTerm(up, down, 0.8 * 16 / 8)]


def with_side_paths(model) -> SidePaths:
    """A rank-8 LoRA as a side path (distorch/lowrank.py) on every Linear of the blocks."""
    side_paths = SidePaths(signature="test")
    for index, (name, layer) in enumerate(n for n in model.named_modules() if n[0].startswith("blocks.")
                                           and isinstance(n[1], torch.nn.Linear)):
        side_paths.add(name, layer, stack_terms(lora_terms(layer, index), layer_geometry(layer), "cpu",
                                                torch.float32))
    model.side_paths = side_paths
    return side_paths


def test_a_lora_on_a_q8_0_streamed_block_equals_the_lora_on_the_dequantized_weight():
    """The side path runs beside the layer on its decoded weight: streamed q8_0 with the LoRA equals the resident
    model with the format's values and the same LoRA, bit for bit (core's merge, LowVramPatch, is checked in real
    ComfyUI: tests/comfyui/inside/check_stream_formats.py)."""
    model = make_quirky()
    plan = share_plan(model, 1.0, "q8_0")
    expected_model = reference(make_quirky, plan, "q8_0")
    with_side_paths(expected_model)
    plain = sampling_run(reference(make_quirky, plan, "q8_0"), inputs(), **RUN)
    expected = sampling_run(expected_model, inputs(), **RUN)
    with_side_paths(model)
    with distorch.stream(model, plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger()):
        got = sampling_run(model, inputs(), **RUN)
    assert relative(expected[0], plain[0]) > 0.01, "the LoRA must change the output"
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)


# -- re-placement ----------------------------------------------------------------------------------------------------

def test_replace_with_a_format_moves_only_what_changes_and_equals_a_fresh_stream(monkeypatch):
    """0.25 -> 0.75 -> 0.25 in q8_0: after each move the output equals a fresh stream of that plan bit for bit, blocks
    streamed before and after keep their encoded buffers, newly streamed ones are encoded once, promoted ones get
    the format's values, and a re-plan equals a fresh plan. The format cannot change while staged."""
    staged = []
    real_stage = streamer_module._StreamedBlock.stage
    monkeypatch.setattr(streamer_module._StreamedBlock, "stage",
                        lambda block, *a, **k: staged.append(block.name) or real_stage(block, *a, **k))
    ledger = Ledger()
    model = make_quirky()
    placement = distorch.stream(model, share_plan(model, 0.25, "q8_0", ledger), debug=True,
                                engine=CpuCopyEngine(deferred=True), ledger=ledger)
    sampling_run(model, inputs(), **RUN)
    ever_streamed = set(placement.plan.streamed)
    for share in (0.75, 0.25):
        new_plan = placement.replan(PlacementRequest("cpu", share * distorch.discover(make_quirky()).block_bytes / GIB,
                                                     stream_format="q8_0"), memory=ROOMY)
        before = {b.name: b.host.data_ptr() for b in placement.streamer._blocks}
        old_streamed = placement.plan.streamed
        staged.clear()
        placement.move_to(new_plan)
        copied = list(staged)
        ever_streamed |= new_plan.streamed
        fresh = make_quirky()
        with_format_values(fresh, ever_streamed - new_plan.streamed, "q8_0")  # promoted: the format's values
        fresh_plan = share_plan(fresh, share, "q8_0")
        # The same placement; promoted blocks lie encoded now and take their stored size again once resident, RAM a
        # fresh plan of the model as loaded (all stored) does not add.
        assert dataclasses.replace(new_plan, ram_added=0) == dataclasses.replace(fresh_plan, ram_added=0)
        assert new_plan.ram_added >= fresh_plan.ram_added
        with distorch.stream(fresh, fresh_plan, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger()):
            expected = sampling_run(fresh, inputs(), **RUN)
        for e, g in zip(expected, sampling_run(model, inputs(), **RUN), strict=True):
            assert torch.equal(e, g)
        kept = old_streamed & new_plan.streamed
        assert {b.name: b.host.data_ptr() for b in placement.streamer._blocks if b.name in kept} == \
            {n: before[n] for n in kept}
        assert sorted(copied) == sorted(new_plan.streamed - old_streamed), "only newly streamed blocks are encoded"
        assert ledger.holdings()[0].pageable == new_plan.streamed_bytes
    with pytest.raises(RuntimeError, match="streams as q8_0 and cannot change to stored while staged"):
        placement.move_to(share_plan(make_quirky(), 0.25))
    placement.close()


def test_encoded_blocks_change_tier_without_decoding(monkeypatch):
    """pinned -> pageable -> pinned in q8_0: the encoded bytes move bit for bit into a buffer of the new tier (no
    decode and re-encode, which would round bf16 values twice), each once; cudaHostRegister is recorded."""
    from distorch import hostbuf

    registered, unregistered = [], []
    monkeypatch.setattr(hostbuf, "_register", lambda tensor: registered.append(tensor.data_ptr()) or True)
    monkeypatch.setattr(hostbuf, "_unregister_storage", lambda storage: unregistered.append(storage.data_ptr()))
    model = bf16_toy()
    pageable = share_plan(model, 0.6, "q8_0")
    pinned = dataclasses.replace(pageable, blocks=tuple(dataclasses.replace(b, pinned=b.streamed)
                                                        for b in pageable.blocks))
    placement = distorch.stream(model, pinned, debug=True, engine=CpuCopyEngine(deferred=True), ledger=Ledger())
    expected = bf16_forward(model)
    encoded = {b.name: b.host[:b.nbytes].clone() for b in placement.streamer._blocks}
    encodes = []
    real_encode = BlockCodec.encode_cluster
    monkeypatch.setattr(BlockCodec, "encode_cluster", lambda codec, *a: encodes.append(a[0]) or real_encode(codec, *a))
    placement.move_to(pageable)
    assert encodes == [], "moved as encoded, not decoded and encoded again"
    assert sorted(unregistered) == sorted(registered) and len(registered) == len(pageable.streamed)
    assert {b.name: b.host[:b.nbytes] for b in placement.streamer._blocks}.keys() == encoded.keys()
    assert all(torch.equal(b.host[:b.nbytes], encoded[b.name]) and not b.buffer.pinned and not b.misplaced
               for b in placement.streamer._blocks)
    placement.move_to(pinned)
    assert len(registered) == 2 * len(pinned.streamed)
    assert torch.equal(bf16_forward(model), expected)
    placement.close()
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]


def test_sizes_as_streamed_come_from_metadata_and_a_staged_block_counts_what_it_holds():
    """A re-plan of a staged q8_0 model counts each encoded block's RAM at its encoded size (a fresh plan of the
    loaded model counts it as stored): the block must not be credited twice its size when another is staged."""
    model = make_quirky()
    placement = distorch.stream(model, share_plan(model, 0.5, "q8_0"), ledger=Ledger())
    from distorch.placement import model_sizes

    sizes = model_sizes(model, placement._layout_now(model), placement._held_encoded())
    held = placement.streamer.staged_encoded()
    assert held and all(sizes.in_ram[name] == nbytes for name, (_, nbytes) in held.items())
    assert sizes.encoded["q8_0"] == model_sizes(make_quirky()).encoded["q8_0"]
    assert math.isclose(sum(n for n, _ in sizes.encoded["fp8_e4m3fn"].values()),
                        sum(n for n, _ in model_sizes(make_quirky()).encoded["fp8_e4m3fn"].values()))
    placement.close()
