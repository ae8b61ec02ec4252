"""How long a pass takes for a placement: the copies of the streamed blocks against the compute that hides them.

A pass runs the blocks in order on the compute stream; the copy stream fetches the streamed ones, one at a time.
With `prefetch` slots, the copy of the k-th streamed block may start once the slot of the (k - prefetch)-th is
released (the end of that block's forward) and the previous copy is done; its forward waits for its copy. So a
streamed block's copy is hidden by the compute of the blocks that run between its slot freeing and its turn:
the resident blocks the planner spreads before it, and with more slots, the blocks of earlier streamed ones too.
Each extra slot costs one block of VRAM, which streams one more block: `choose_prefetch` weighs the two.

The times come from a run (`Timings`: per-block forward time and copy rates, measured by distorch.calibrate on
the CUDA streams, or injected in tests); before any run only the copies can be predicted, from nominal rates.
Pure Python: the CLI and the planner use it without torch.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

MAX_PREFETCH = 4  # more slots than this has not paid off in published measurements (SGLang #31538)
NEAR_TIE = 0.02  # a deeper prefetch must predict a pass at least 2 % faster to be worth its VRAM
MAX_SWAPS = 8  # rounds of the cost model's block choice (each tries every waiting block against every resident one)
MOVE_GAIN = 0.05  # a placed model re-places for a predicted pass at least 5 % faster (re-staging costs copies)

# Host-to-device bytes/s per tier before a run measures them (research/prefetch.md §3.2: PCIe 4.0 x16 pinned copies
# reach ~24 GB/s, pageable ones about a third of that; a donor GPU without NVLink copies over the same bus).
NOMINAL_RATES = {"pinned_ram": 24e9, "pageable_ram": 8e9, "donor_gpu": 20e9, "disk": 3e9}


@dataclass(frozen=True)
class Timings:
    """What a run measured: each block's forward (seconds, execution order) and copy rates per storage tier.

    `activation_bytes` is ComfyUI's activation estimate for the measured run: forward times are scaled by the ratio
    of estimates to predict another resolution or frame count (the estimate is linear in the latent's area).
    """

    compute_s: tuple[float, ...] = ()
    rates: Mapping[str, float] = field(default_factory=dict)  # tier -> bytes/s; missing tiers use NOMINAL_RATES
    activation_bytes: int = 0
    passes: int = 0  # how many passes were measured

    def rate(self, tier: str) -> float:
        return self.rates.get(tier) or NOMINAL_RATES.get(tier, NOMINAL_RATES["pinned_ram"])

    def compute_for(self, activation_bytes: int | None) -> tuple[float, ...]:
        """Per-block forward times for a run with `activation_bytes` of activations (None: as measured)."""
        if not activation_bytes or not self.activation_bytes:
            return self.compute_s
        scale = activation_bytes / self.activation_bytes
        return tuple(t * scale for t in self.compute_s)


@dataclass(frozen=True)
class PassEstimate:
    """One pass of a placement, predicted: copy and compute totals, the pass with overlap, and who waits."""

    prefetch: int
    copy_s: float  # all streamed blocks' copies, back to back
    compute_s: float | None  # all blocks' forwards (None: not measured yet)
    pass_s: float | None  # the pass with copies overlapping compute (None: not measured yet)
    waiting: tuple[int, ...] = ()  # streamed blocks whose forward waits for its copy (block indices)
    wait_s: float = 0.0  # time the compute stream waits for copies in the pass

    def as_dict(self) -> dict:
        return {"prefetch": self.prefetch, "copy_s": round(self.copy_s, 6),
                "compute_s": None if self.compute_s is None else round(self.compute_s, 6),
                "pass_s": None if self.pass_s is None else round(self.pass_s, 6),
                "waiting": list(self.waiting), "wait_s": round(self.wait_s, 6)}


def copy_times(block_bytes: Sequence[int], tiers: Mapping[int, str], timings: Timings | None) -> dict[int, float]:
    """Seconds to copy each streamed block (index -> tier) at the measured (or nominal) rate of its tier."""
    timings = timings or Timings()
    return {i: block_bytes[i] / timings.rate(tier) for i, tier in tiers.items()}


def estimate_pass(compute_s: Sequence[float] | None, copy_s: Mapping[int, float], prefetch: int) -> PassEstimate:
    """The steady-state pass (the second of two back to back, so the first blocks were fetched during the
    previous pass's tail, as the streamer does) with `copy_s` streamed blocks and `prefetch` slots."""
    total_copy = sum(copy_s.values())
    if not compute_s:
        return PassEstimate(prefetch, total_copy, None, None)
    streamed = sorted(copy_s)
    order = list(enumerate(compute_s)) * 2
    now, copy_free, freed, waits = 0.0, 0.0, [], {}
    first_pass_end = 0.0
    for position, (index, seconds) in enumerate(order):
        if index in copy_s:
            k = len(freed)  # streamed blocks computed so far, both passes
            slot_free = freed[k - prefetch] if k >= prefetch else 0.0
            copy_end = max(copy_free, slot_free) + copy_s[index]
            copy_free = copy_end
            if position >= len(compute_s) and copy_end > now:
                waits[index] = waits.get(index, 0.0) + copy_end - now
            now = max(now, copy_end) + seconds
            freed.append(now)
        else:
            now += seconds
        if position == len(compute_s) - 1:
            first_pass_end = now
    waiting = tuple(i for i in streamed if waits.get(i, 0.0) > 1e-9)
    return PassEstimate(prefetch, total_copy, sum(compute_s), now - first_pass_end, waiting, sum(waits.values()))


def hide_copies(compute_s: Sequence[float], copy_s: Mapping[int, float], prefetch: int,
                swappable: Callable[[int, int], bool]) -> tuple[dict[int, float], PassEstimate]:
    """Which blocks to stream, chosen by the pass they predict: while a streamed block's forward waits for its copy,
    it is swapped for the resident block (`swappable(streamed, resident)`: the same bytes as stored and as streamed,
    so what leaves the compute device, the slots and the fit stay as they are) that predicts the fastest pass, if
    faster. Greedy, at most `MAX_SWAPS` swaps; with equal forwards everywhere the even spread is kept. Returns the
    streamed blocks' copy times and their predicted pass."""
    copy_s = dict(copy_s)
    best = estimate_pass(compute_s, copy_s, prefetch)
    for _ in range(MAX_SWAPS):
        if not best.waiting or best.pass_s is None:
            break
        found = None
        for i in best.waiting:
            for j in range(len(compute_s)):
                if j in copy_s or not swappable(i, j):
                    continue
                trial = {k: v for k, v in copy_s.items() if k != i} | {j: copy_s[i]}
                estimate = estimate_pass(compute_s, trial, prefetch)
                if estimate.pass_s < (found[1] if found else best).pass_s * (1 - 1e-6):
                    found = (trial, estimate)
        if found is None:
            break
        copy_s, best = found
    return copy_s, best


def choose_prefetch(estimates: Sequence[PassEstimate], default: int) -> tuple[int, str]:
    """The depth to use and why: the fastest predicted pass (a deeper one only when it gains `NEAR_TIE`);
    `default` when nothing was measured yet."""
    if not estimates or estimates[0].pass_s is None:
        return default, f"{default} slots, the default: no run measured yet (the first run is timed)"
    best = estimates[0]
    for candidate in estimates[1:]:
        if candidate.pass_s < best.pass_s * (1 - NEAR_TIE):
            best = candidate
    others = ", ".join(f"{e.pass_s * 1000:.0f} ms with {e.prefetch}" for e in estimates if e is not best)
    return best.prefetch, (f"{best.prefetch} slot{'s' if best.prefetch > 1 else ''}: predicted pass "
                           f"{best.pass_s * 1000:.0f} ms" + (f" ({others})" if others else ""))
