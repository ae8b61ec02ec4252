"""Auto placement without ComfyUI: plans against a run's budget (distorch.budget), ComfyUI's activation estimate
(distorch.workload) and the prefetch depth the cost model picks (distorch.costmodel)."""

import pytest

from distorch import ModelSizes, PlacementRequest
from distorch.budget import NO_LIMIT, ComputeBudget, replacement_reason
from distorch.costmodel import Timings, choose_prefetch, estimate_pass, hide_copies
from distorch.planner import adjust_streamed, choose_streamed, plan_request, streamed_within
from distorch.report import plan_to_dict
from distorch.units import GIB, MIB
from distorch.workload import Family, Workload, WorkloadError, core_weight_budget, detect_family, estimate

BLOCK = 700 * MIB
REST = 600 * MIB
MEMORY = {"cuda:0": 24 * GIB, "cpu": 256 * GIB}
AUTO = PlacementRequest.validate("cuda:0", auto=True)


def wan_like(blocks: int = 40) -> ModelSizes:
    return ModelSizes("WanModel", tuple((f"blocks.{i}", BLOCK) for i in range(blocks)), REST)


def footprint(plan, extras: int = 0) -> int:
    return plan.compute_bytes + extras


def auto_plan(budget_bytes: int, extras: int = 0, timings=None, request=AUTO, blocks: int = 40):
    return plan_request(wan_like(blocks), request, memory=MEMORY, timings=timings,
                        budget=ComputeBudget(budget_bytes, extra_bytes=extras, source="test"))


@pytest.mark.parametrize("budget_gb", [3, 5.5, 9, 14.2, 20, 27])
def test_auto_plan_fits_the_budget_with_the_fewest_streamed_blocks(budget_gb):
    budget = int(budget_gb * GIB)
    plan = auto_plan(budget, extras=300 * MIB)
    assert plan.mode == "auto" and not plan.warnings
    assert footprint(plan, 300 * MIB) <= budget
    # One block fewer streamed would not fit: resident + one more block (and the same slots) is over the budget.
    assert footprint(plan, 300 * MIB) + BLOCK > budget or not plan.streamed


def test_nothing_streams_when_the_model_fits():
    plan = auto_plan(40 * BLOCK + REST)
    assert plan.streamed == frozenset() and plan.compute_bytes == 40 * BLOCK + REST


def test_auto_streams_more_as_the_budget_shrinks():
    streamed = [auto_plan(int(gb * GIB)).streamed_bytes for gb in (27, 20, 14, 9, 5, 2)]
    assert streamed == sorted(streamed) and len(set(streamed)) == len(streamed)


def test_streamed_blocks_are_spread_between_resident_ones():
    plan = auto_plan(14 * GIB)
    streamed = sorted(int(name.split(".")[1]) for name in plan.streamed)
    gaps = [b - a for a, b in zip(streamed, streamed[1:])]
    assert max(gaps) <= 3, streamed


def test_a_fixed_amount_that_does_not_fit_the_budget_streams_more_and_says_so():
    request = PlacementRequest.validate("cuda:0", 4.0)
    plan = auto_plan(10 * GIB, request=request)
    assert plan.mode == "fixed" and footprint(plan) <= 10 * GIB
    assert plan.streamed_bytes > 4 * GIB + BLOCK
    assert any("does not fit the budget for this run" in w and "more blocks streamed" in w for w in plan.warnings)
    roomy = auto_plan(40 * GIB, request=request)
    assert 4 * GIB <= roomy.streamed_bytes < 4 * GIB + BLOCK and not roomy.warnings, "a fitting amount is kept"


def test_a_budget_too_small_for_every_block_streamed_warns_once():
    plan = auto_plan(1 * GIB)
    assert len(plan.streamed) == 40
    assert len(plan.warnings) == 1 and "even with every block streamed" in plan.warnings[0]


@pytest.mark.parametrize("room, streamed", [(600, [0, 1, 3, 4]), (700, [0, 1, 3]), (750, []), (500, None)])
def test_streamed_within_counts_its_own_slots(room, streamed):
    """Streaming the 300-byte block would make both slots 300 bytes: the fit streams the small ones instead."""
    sizes = [100, 100, 300, 100, 100]
    chosen, fits = streamed_within(sizes, 50, room, 0, 2)
    if streamed is None:
        assert not fits and chosen == [0, 1, 2, 3, 4]
        return
    resident = sum(n for i, n in enumerate(sizes) if i not in chosen)
    assert fits and 50 + resident + 2 * max((sizes[i] for i in chosen), default=0) <= room
    assert sum(sizes[i] for i in chosen) == sum(sizes[i] for i in streamed)


def test_without_a_budget_auto_plans_for_the_device():
    plan = plan_request(wan_like(), AUTO, memory=MEMORY)
    assert plan.budget is not None and "no run seen yet" in plan.budget.source
    assert plan.compute_bytes <= plan.budget.weight_bytes


def test_report_and_dict_say_how_the_plan_was_decided():
    plan = plan_request(wan_like(), AUTO, memory=MEMORY,
                        budget=ComputeBudget(12 * GIB, activation_bytes=6 * GIB, source="ComfyUI's test budget"))
    text = plan.report()
    assert "placement: automatic, fitted to the run's budget of 12.00 GB on cuda:0 (ComfyUI's test budget)" in text
    assert "activations 6.00 GB" in text and "prefetch: 2 slots, the default" in text
    assert "resident: " in text and "fits the budget" in text and "predicted per pass: copies" in text
    data = plan_to_dict(plan)
    assert data["mode"] == "auto" and data["budget"]["weight_bytes"] == 12 * GIB
    assert data["budget"]["activation_bytes"] == 6 * GIB and data["schedule"]["copy_s"] > 0
    fixed = plan_to_dict(plan_request(wan_like(), PlacementRequest.validate("cuda:0", 20.0), memory=MEMORY))
    assert fixed["mode"] == "fixed" and fixed["budget"] is None
    unlimited = plan_request(wan_like(), PlacementRequest.validate("cuda:0", 20.0), memory=MEMORY,
                             budget=ComputeBudget(NO_LIMIT, source="no limit from ComfyUI"))
    assert "placement: fixed amount, no limit on cuda:0 for this run (no limit from ComfyUI)" in unlimited.report()


# -- the cost model -----------------------------------------------------------------------------------------------

def test_copies_hidden_behind_compute_cost_nothing():
    estimate_ = estimate_pass([1.0] * 8, {1: 0.5, 5: 0.5}, prefetch=2)
    assert estimate_.pass_s == pytest.approx(8.0) and estimate_.waiting == ()


def test_a_copy_longer_than_the_compute_before_it_waits():
    estimate_ = estimate_pass([0.1] * 4, {1: 1.0, 2: 1.0}, prefetch=1)
    assert estimate_.waiting == (1, 2) and estimate_.pass_s > 0.4 and estimate_.wait_s > 0


def test_more_slots_hide_a_burst_of_streamed_blocks():
    compute = [1.0] * 8
    copies = {4: 0.9, 5: 0.9, 6: 0.9}  # three streamed blocks in a row
    one, three = estimate_pass(compute, copies, 1), estimate_pass(compute, copies, 3)
    assert three.pass_s < one.pass_s and three.waiting == ()


def test_choose_prefetch_takes_a_deeper_prefetch_only_when_it_pays():
    flat = [estimate_pass([1.0] * 8, {2: 0.2, 6: 0.2}, d) for d in (1, 2, 3)]
    assert choose_prefetch(flat, 2)[0] == 1, "copies already hidden: the shallowest depth"
    unmeasured = [estimate_pass(None, {2: 0.2}, d) for d in (1, 2)]
    assert choose_prefetch(unmeasured, 2) == (2, "2 slots, the default: no run measured yet (the first run is timed)")


def test_auto_picks_the_prefetch_the_measured_times_favour():
    """Copies of 700 MB at 24 GB/s take 29 ms, a block's forward 40 ms. With a few streamed blocks, each behind a
    resident one, one slot hides every copy, and the slot saved keeps one more block resident. With most blocks
    streamed, neighbours are both streamed: one slot would make each copy wait for the previous block, so two."""
    measured = Timings(compute_s=(0.04,) * 40, rates={"pinned_ram": 24e9}, activation_bytes=6 * GIB)
    sparse = auto_plan(24 * GIB, timings=measured)
    assert sparse.prefetch == 1 and sparse.schedule.waiting == () and "predicted pass" in sparse.prefetch_reason
    assert len(sparse.streamed) < len(auto_plan(24 * GIB).streamed), "the default 2 slots stream one block more"
    dense = auto_plan(14 * GIB, timings=measured)
    assert dense.prefetch == 2 and dense.schedule.waiting == ()


def test_bursty_placements_make_the_cost_model_pay_for_depth():
    """Half of a 20-block model streamed, copies 3x the per-block compute: depth 1 stalls on every streamed block;
    two slots let each copy start a block earlier, and the cost model takes them."""
    timings = Timings(compute_s=(0.01,) * 20, rates={"pinned_ram": BLOCK / 0.03}, activation_bytes=GIB)
    plan = auto_plan(10 * BLOCK + REST, timings=timings, blocks=20)
    estimates = {d: estimate_pass(timings.compute_s, {i: 0.03 for i, b in enumerate(plan.blocks) if b.streamed}, d)
                 for d in (1, 2)}
    assert estimates[2].pass_s < estimates[1].pass_s
    assert plan.prefetch >= 2, plan.prefetch_reason


MIXED = tuple(0.03 if i % 7 < 3 else 0.004 for i in range(40))  # forwards: three heavy blocks, four light, ...


def test_the_cost_model_moves_streamed_blocks_where_their_copies_hide():
    """Blocks of one size whose forwards differ: spread evenly, streamed blocks among light ones wait for their
    copies; swapping them with resident blocks nearer the heavy ones hides more. As many blocks stream, so the bytes
    that leave, the slots and the fit are unchanged."""
    even = {i: 0.02 for i in choose_streamed([1] * 40, 28)}
    before = estimate_pass(MIXED, even, 2)
    chosen, after = hide_copies(MIXED, even, 2, lambda i, j: True)
    assert before.waiting and after.pass_s < 0.95 * before.pass_s and len(chosen) == len(even)
    assert after == estimate_pass(MIXED, chosen, 2)
    assert hide_copies(MIXED, even, 2, lambda i, j: False)[0] == even, "only swappable blocks move"
    assert hide_copies((0.01,) * 40, even, 2, lambda i, j: True)[0] == even, "equal forwards: the even spread stays"


def test_an_auto_plan_with_measurements_streams_the_blocks_whose_copies_hide():
    """Once a run was measured the planner takes the cost model's blocks in auto mode and says so; a placed model
    moves to them only for a pass predicted at least 5 % faster than its own with the same measurements."""
    timings = Timings(compute_s=MIXED, rates={"pinned_ram": BLOCK / 0.02}, activation_bytes=GIB)
    budget = ComputeBudget(20 * BLOCK + REST, source="test")
    plain = plan_request(wan_like(), AUTO, memory=MEMORY, budget=budget)
    timed = plan_request(wan_like(), AUTO, memory=MEMORY, budget=budget, timings=timings)
    spread = {i: 0.02 for i in choose_streamed([BLOCK] * 40, BLOCK * len(timed.streamed))}
    assert timed.schedule.pass_s < estimate_pass(MIXED, spread, timed.prefetch).pass_s
    assert timed.streamed_reason.startswith("placed where their copies hide") and timed.compute_bytes <= budget.room
    assert "streamed blocks: placed where their copies hide" in timed.report()
    assert plan_to_dict(timed)["streamed_reason"] == timed.streamed_reason and not plain.streamed_reason
    staged = plan_request(wan_like(), AUTO, memory=MEMORY, budget=budget, timings=timings, current=plain)
    assert staged.schedule.pass_s <= 0.95 * staged.current_schedule.pass_s
    assert "the cost model predicts a pass of" in replacement_reason(plain, staged, budget, staged=True)
    settled = plan_request(wan_like(), AUTO, memory=MEMORY, budget=budget, timings=timings, current=staged)
    assert replacement_reason(staged, settled, budget, staged=True) is None, "once there, it stays"
    close = ComputeBudget(26 * BLOCK + REST, source="test")  # here the choice gains under 5 %: no move for it
    placed = plan_request(wan_like(), AUTO, memory=MEMORY, budget=close)
    replanned = plan_request(wan_like(), AUTO, memory=MEMORY, budget=close, timings=timings, current=placed)
    assert replanned.schedule.pass_s < replanned.current_schedule.pass_s
    assert replacement_reason(placed, replanned, close, staged=True) is None


def test_timings_scale_with_the_activation_estimate():
    timings = Timings(compute_s=(0.01, 0.02), activation_bytes=2 * GIB)
    assert timings.compute_for(4 * GIB) == pytest.approx((0.02, 0.04))
    assert timings.compute_for(None) == (0.01, 0.02)


# -- ComfyUI's activation estimate --------------------------------------------------------------------------------

WAN14B = {"head.modulation": (1, 2, 5120), "head.head.weight": (64, 5120),
          "patch_embedding.weight": (5120, 16, 1, 2, 2), "blocks.0.ffn.0.weight": (13824, 5120)}


def test_wan_14b_estimate_is_comfyuis():
    family = detect_family(WAN14B)
    assert family.memory_usage_factor == pytest.approx(5120 / 2222)
    at_480p = estimate(family, Workload(832, 480, 81))
    assert at_480p.latent_shape == (1, 16, 21, 60, 104)
    # memory_required: area x 2 bytes x 0.01 x factor MB (the digest's worked value: 5.9 GiB).
    assert at_480p.minimum_bytes == int(21 * 60 * 104 * 2 * 0.01 * 5120 / 2222 * MIB)
    assert at_480p.cfg_bytes == pytest.approx(2 * at_480p.minimum_bytes, rel=1e-6)
    assert estimate(family, Workload(1280, 720, 81)).minimum_bytes / GIB == pytest.approx(13.6, abs=0.05)


@pytest.mark.parametrize("shapes, name", [
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}, "Flux"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,)}, "Flux"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "double_stream_modulation_img.lin.weight": (1, 1),
      "img_in.weight": (6144, 128)}, "Flux.2"),
    ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (3072,)}, "HunyuanVideo"),
    ({"txt_in.individual_token_refiner.blocks.0.norm1.weight": (2048,), "cond_type_embedding.weight": (3, 2048)},
     "HunyuanVideo 1.5"),
    ({"txt_norm.weight": (3584,), "img_in.weight": (3072, 64)}, "Qwen-Image"),
    ({"adaln_single.emb.timestep_embedder.linear_1.bias": (1,), "transformer_blocks.0.attn2.to_k.weight": (2048, 4096)},
     "LTX-Video"),
    ({"adaln_single.emb.timestep_embedder.linear_1.bias": (1,), "audio_adaln_single.linear.weight": (1, 1)}, "LTX-2"),
    ({"head.modulation": (1, 2, 3072), "head.head.weight": (192, 3072)}, "Wan 2.2 5B"),
])
def test_families_are_detected_from_names_and_shapes(shapes, name):
    assert detect_family(shapes).name == name


def test_unknown_family_and_bad_workloads():
    assert detect_family({"blocks.0.weight": (4, 4)}) is None
    with pytest.raises(WorkloadError, match="width must be a whole number >= 1"):
        Workload(0, 480)


def test_video_latents_and_packed_ltx2():
    wan22_5b = detect_family({"head.modulation": (1, 2, 3072), "head.head.weight": (192, 3072)})
    assert wan22_5b.latent_shape(Workload(1280, 704, 121)) == (1, 48, 31, 44, 80)
    ltx2 = Family("LTX-2", 0.077, 128, 32, temporal=8, packed=True)
    assert ltx2.latent_shape(Workload(1280, 704, 121, 2)) == (2, 1, 128 * 16 * 22 * 40)


def test_core_weight_budget_is_free_minus_the_larger_minimum():
    assert core_weight_budget(24 * GIB, 6 * GIB) == 24 * GIB - 6 * GIB - 400 * MIB
    assert core_weight_budget(24 * GIB, 0) == 24 * GIB - int(0.8 * GIB) - 400 * MIB
    assert core_weight_budget(4 * GIB, 6 * GIB) == 0


# -- re-placement: which blocks move, and when ------------------------------------------------------------------

def test_a_staged_model_moves_only_when_over_budget_or_more_than_a_block_to_gain():
    current = auto_plan(14 * GIB)
    same = auto_plan(14 * GIB)
    slightly_more = auto_plan(14 * GIB + BLOCK // 2)
    much_more = auto_plan(16 * GIB)
    budget = ComputeBudget(14 * GIB + BLOCK // 2)
    assert replacement_reason(current, same, ComputeBudget(14 * GIB), staged=True) is None
    assert replacement_reason(current, slightly_more, budget, staged=True) is None, "less than a block: stay"
    assert "more than one block" in replacement_reason(current, much_more, ComputeBudget(16 * GIB), staged=True)
    smaller = auto_plan(12 * GIB)
    assert "over this run's budget" in replacement_reason(current, smaller, ComputeBudget(12 * GIB), staged=True)
    assert replacement_reason(current, much_more, None, staged=False) == "planned for this run before the first load"


def test_a_staged_plan_grows_and_shrinks_its_streamed_set():
    """Re-planning a staged model for another budget keeps the blocks that stay streamed: only the difference moves."""
    sizes = wan_like()
    current = auto_plan(14 * GIB)
    tighter = plan_request(sizes, AUTO, memory=MEMORY, budget=ComputeBudget(10 * GIB), current=current)
    looser = plan_request(sizes, AUTO, memory=MEMORY, budget=ComputeBudget(18 * GIB), current=current)
    assert tighter.streamed > current.streamed and looser.streamed < current.streamed
    assert len(tighter.streamed) == len(auto_plan(10 * GIB).streamed), "as few blocks as a fresh plan"
    assert len(looser.streamed) == len(auto_plan(18 * GIB).streamed)


@pytest.mark.parametrize("target", [0, 1, 250, 401, 700])
def test_adjust_streamed_reaches_the_target_with_the_fewest_moves(target):
    sizes = [100] * 7
    current = [1, 3, 5]
    chosen = adjust_streamed(sizes, current, target)
    assert sum(sizes[i] for i in chosen) >= target and sum(sizes[i] for i in chosen) - 100 < max(target, 1)
    assert set(chosen) <= set(current) or set(chosen) >= set(current), "only additions or only removals"


# -- timing a run on the CPU engine -------------------------------------------------------------------------------

class FakeClock:
    """Seconds that advance only when a forward or a copy says so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_run_timer_measures_forwards_and_copies_after_the_first_pass():
    """The first pass is not measured; the next `passes` are averaged per block; copies give a rate per tier."""
    import torch

    from distorch import CpuCopyEngine
    from distorch.calibrate import RunTimer
    from distorch.placement import Placement
    from distorch.toy import make_toy_dit

    model = make_toy_dit(depth=4, dim=32)
    clock = FakeClock()
    # Every block streamed through 2 slots: each pass copies each block.
    placement = Placement.planned(model, PlacementRequest.validate("cpu", 1.0), memory={"cpu": 64 * GIB},
                                  places_resident=True, engine=CpuCopyEngine())
    placement.open()
    blocks = [model.get_submodule(b.name) for b in placement.plan.blocks]
    timer = RunTimer(blocks, torch.device("cpu"), placement.streamer, activation_bytes=GIB, clock=clock).attach()
    compute = {id(b): 0.010 * (i + 1) for i, b in enumerate(blocks)}  # block i's forward takes (i + 1) x 10 ms
    hooks = [b.register_forward_pre_hook(lambda m, a: setattr(clock, "now", clock.now + compute[id(m)]))
             for b in blocks]
    inner = placement.streamer.engine._inner
    real_copy = inner.copy

    def timed_copy(dst, src, *, after, ready):  # a copy takes 1 ms per KiB
        real_copy(dst, src, after=after, ready=ready)
        clock.now += dst.numel() * dst.element_size() / 1024 * 0.001

    inner.copy = timed_copy
    x = torch.randn(1, 8, 16)  # the toy's 16 latent channels
    with torch.inference_mode():
        for _ in range(5):
            model(x, torch.zeros(1))
    measured = timer.timings()
    timer.detach()
    for hook in hooks:
        hook.remove()
    plan = placement.plan
    placement.release()
    assert measured.passes == 3 and measured.activation_bytes == GIB
    assert measured.compute_s == pytest.approx([0.010, 0.020, 0.030, 0.040], abs=1e-9)
    assert measured.rates["pageable_ram"] == pytest.approx(1024 / 0.001)
    # The next plan of a model of these blocks uses them: the cost model predicts its pass and picks the slots.
    sizes = ModelSizes("toy", tuple((b.name, b.nbytes) for b in plan.blocks), plan.rest_bytes)
    budget = ComputeBudget(sizes.total_bytes - 2 * sizes.blocks[0][1], activation_bytes=GIB)
    planned = plan_request(sizes, PlacementRequest.validate("cpu", auto=True), memory={"cpu": 64 * GIB},
                           budget=budget, timings=measured)
    assert "predicted pass" in planned.prefetch_reason and planned.schedule.compute_s == pytest.approx(0.1)
