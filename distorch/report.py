"""Renders a plan for people (the table in the log, on the node and in the CLI) and for the UI (a JSON dict).

Totals are net: "VRAM freed" is what leaves the compute device minus the streaming slots the moved
blocks come back through, so a plan that streams too little shows that it costs VRAM. Every rendering
says which weight format the sizes count: a file's header (the CLI) or the model as loaded (the node),
which differ when the loader builds another dtype (fp8 from a bf16 file, fp32 on some CPUs). With a stream
format, streamed blocks are held (RAM, donor VRAM) and copied in their encoded size; what leaves the compute
device is counted as stored, and the decode buffer is counted on the compute device beside the slots.
"""

from dataclasses import asdict, dataclass

from .units import describe_dtypes, format_gb

PLAN_DICT_VERSION = 1

# Tier values (distorch.Tier) in the order the table and the UI's legend list them, with their table names.
TIER_ORDER = ("resident", "pinned_ram", "pageable_ram", "donor_gpu", "disk")
_ROLES = {
    "resident": "resident",
    "pinned_ram": "pinned RAM, streamed",
    "pageable_ram": "pageable RAM, streamed (slow)",
    "donor_gpu": "donor GPU, streamed",
    "disk": "disk, read on demand",
}


@dataclass(frozen=True)
class TierRow:
    """One line of the plan table: a device and how its blocks are used."""

    device: str
    role: str
    blocks: int
    nbytes: int  # what these blocks take on `device` (streamed blocks: as they stream, encoded in a stream format)
    moved_off: int  # bytes these blocks keep off the compute device (gross: the slots come off once, in the totals)
    tier: str = ""


@dataclass(frozen=True)
class PlanTotals:
    """The plan in a few numbers (bytes), as the node's summary, the CLI and the UI show them."""

    model_bytes: int  # all weights: blocks and the rest
    compute_bytes: int  # weights on the compute device: resident weights, the streaming slots, the decode buffer
    slots_bytes: int
    moved_off_bytes: int  # streamed blocks (as stored): kept off the compute device between their forwards
    vram_freed_bytes: int  # net: moved off minus the slots and decode buffer (negative when streaming costs VRAM)
    ram_bytes: int  # system RAM holding streamed blocks (pinned + pageable)
    pinned_bytes: int
    pageable_bytes: int
    donor_bytes: int  # donor GPUs' VRAM holding streamed blocks
    disk_bytes: int  # streamed blocks read from the model file on demand
    per_pass_bytes: int  # copied to the compute device by each forward pass (one per step when CFG is batched)
    decode_bytes: int = 0  # the stream format's decode buffer (and its scratch) on the compute device
    saved_bytes: int = 0  # what the stream format saves in host RAM / donor VRAM, and on every pass's copies


def plan_totals(plan) -> PlanTotals:
    by_tier = {tier: 0 for tier in TIER_ORDER}
    for block in plan.blocks:
        by_tier[_tier(block)] = by_tier.get(_tier(block), 0) + _held(block)
    streamed = plan.streamed_stored_bytes
    slots = plan.prefetch * plan.slot_bytes
    on_cpu = plan.compute_device == "cpu"
    return PlanTotals(
        model_bytes=plan.resident_bytes + streamed,
        compute_bytes=plan.compute_bytes,
        slots_bytes=slots,
        moved_off_bytes=streamed,
        vram_freed_bytes=0 if on_cpu else streamed - slots - plan.decode_bytes,
        ram_bytes=by_tier["pinned_ram"] + by_tier["pageable_ram"],
        pinned_bytes=by_tier["pinned_ram"],
        pageable_bytes=by_tier["pageable_ram"],
        donor_bytes=by_tier["donor_gpu"],
        disk_bytes=by_tier["disk"],
        per_pass_bytes=plan.streamed_bytes,
        decode_bytes=plan.decode_bytes,
        saved_bytes=plan.saved_bytes,
    )


def _held(block) -> int:
    """Bytes a block takes where it is stored: as it streams when streamed."""
    return block.stream_nbytes if block.streamed else block.nbytes


def stream_format_note(plan) -> str:
    """One line on the stream format when it makes streamed blocks smaller ("" otherwise)."""
    fmt = plan.stream_format
    if fmt == "stored" or not plan.streamed:
        return ""
    decoding = [b for b in plan.blocks if b.decodes]
    stored = sum(b.nbytes for b in decoding)
    note = (f"stream format {fmt}: {len(decoding)} streamed blocks held and copied as "
            f"{format_gb(sum(b.stream_nbytes for b in decoding))} instead of {format_gb(stored)} "
            f"(saves {format_gb(stored - sum(b.stream_nbytes for b in decoding))}), decoded on {plan.compute_device} "
            f"into a {format_gb(plan.decode_bytes)} buffer")
    as_stored = sum(1 for b in plan.blocks if b.streamed and not b.decodes)
    if as_stored:
        note += f"; {as_stored} streamed as stored (the disk tier, or nothing {fmt} encodes)"
    return note


def dtype_note(plan) -> str:
    """Which weight format the plan's sizes count, and where that was read."""
    formats = describe_dtypes(dict(plan.dtype_bytes))
    source = plan.dtype_source
    if source == "file":
        return f"sizes in the file's format ({formats}); a loader that builds another dtype changes them"
    if source == "model":
        return f"sizes as loaded ({formats})"
    return f"sizes in {formats}" if formats != "unknown" else ""


def tier_rows(plan) -> list[TierRow]:
    """Per tier: resident (compute), donor GPU, pinned RAM, pageable RAM, disk; empty tiers left out."""
    compute = plan.compute_device
    rows = [TierRow(compute, "resident", sum(not b.streamed for b in plan.blocks), plan.resident_bytes, 0,
                    "resident")]
    groups: dict[tuple[str, str], list] = {}
    for block in plan.blocks:
        if block.streamed:
            groups.setdefault((block.device, _tier(block)), []).append(block)
    for (device, tier), blocks in sorted(groups.items(), key=lambda item: _tier_order(*item[0])):
        stored = sum(b.nbytes for b in blocks)
        rows.append(TierRow(device, _role(tier, compute), len(blocks), sum(_held(b) for b in blocks),
                            stored if compute != "cpu" else 0, tier))
    return rows


def format_report(plan) -> str:
    compute = plan.compute_device
    totals = plan_totals(plan)
    lines = [
        f"DisTorch plan for {plan.model_name}: {format_gb(totals.model_bytes)} "
        f"({len(plan.blocks)} blocks + {format_gb(plan.rest_bytes)} other weights), compute on {compute}",
    ]
    for note in (dtype_note(plan), stream_format_note(plan)):
        if note:
            lines.append(f"  {note}")
    lines.append(f"  {'device':<8} {'tier':<29} {'blocks':>6} {'weights':>10} {'moved off':>10}")
    for row in tier_rows(plan):
        moved = format_gb(row.moved_off) if row.moved_off else "-"
        lines.append(f"  {row.device:<8} {row.role:<29} {row.blocks:>6} {format_gb(row.nbytes):>10} {moved:>10}")
    lines.extend(_decision_lines(plan))
    lines.extend(_reason_lines(plan))
    if plan.streamed:
        lines.extend(_streaming_lines(plan, totals))
        lines.extend(_schedule_lines(plan))
    lines.append(_ledger_line(plan))
    lines.extend(f"  warning: {w}" for w in plan.warnings)
    return "\n".join(lines)


def _decision_lines(plan) -> list[str]:
    """How the amount was decided: automatic or fixed, against which budget, with how many slots and why."""
    budget = plan.budget
    if budget is None:
        return []
    auto = plan.mode == "auto"
    if budget.limited:
        mode = "automatic, fitted to" if auto else "fixed amount, checked against"
        text = f"  placement: {mode} the run's budget of {format_gb(budget.weight_bytes)} on {plan.compute_device}"
    else:
        text = f"  placement: {'automatic' if auto else 'fixed amount'}, no limit on {plan.compute_device} for this run"
    if budget.source:
        text += f" ({budget.source})"
    lines = [text]
    details = []
    if budget.activation_bytes is not None:
        details.append(f"activations {format_gb(budget.activation_bytes)} as ComfyUI estimates them")
    if budget.extra_bytes:
        details.append(f"{format_gb(budget.extra_bytes)} of non-weight extras kept on {plan.compute_device}")
    if details:
        lines.append(f"    {'; '.join(details)}")
    if plan.streamed and plan.prefetch_reason:
        lines.append(f"  prefetch: {plan.prefetch_reason}")
    if plan.streamed and plan.streamed_reason:
        lines.append(f"  streamed blocks: {plan.streamed_reason}")
    return lines


def _schedule_lines(plan) -> list[str]:
    """The cost model's view of one pass: copy time against compute, and which blocks wait for their copies."""
    estimate = plan.schedule
    if estimate is None:
        return []
    text = f"  predicted per pass: copies {estimate.copy_s * 1000:.0f} ms"
    if estimate.pass_s is None:
        return [text + " at nominal rates (compute not measured yet)"]
    text += f", compute {estimate.compute_s * 1000:.0f} ms, pass {estimate.pass_s * 1000:.0f} ms"
    if not estimate.waiting:
        return [text + ": every copy hides behind the compute of the blocks before it"]
    return [text + f": {len(estimate.waiting)} streamed block{'s' if len(estimate.waiting) > 1 else ''} wait "
            f"{estimate.wait_s * 1000:.0f} ms in all for their copies"]


def _reason_lines(plan) -> list[str]:
    """Why the blocks got their tiers: one line per (tier, reason), with the block count (resident blocks only when
    a run's budget decided them)."""
    counts: dict[tuple[str, str], int] = {}
    budgeted = plan.budget is not None
    for block in plan.blocks:
        if (block.streamed or budgeted) and block.reason:
            key = (block.tier.value, block.reason)
            counts[key] = counts.get(key, 0) + 1
    return [f"  {tier}: {n} block{'s' if n > 1 else ''}, {reason}" for (tier, reason), n in counts.items()]


def _ledger_line(plan) -> str:
    """What the other DisTorch models held or reserved when the plan was made (the ledger's view)."""
    held = "; ".join(_holding_text(h) for h in plan.others) or "none"
    text = f"  other DisTorch models: {held}"
    if plan.pinned_elsewhere:
        text += f"; ComfyUI pinned {format_gb(plan.pinned_elsewhere)}"
    if plan.ram_added:
        text += f"; this plan adds {format_gb(plan.ram_added)} of RAM"
    return text


def _holding_text(holding) -> str:
    parts = [f"{label} {format_gb(n)}" for label, n in (("pinned", holding.pinned), ("pageable", holding.pageable),
                                                        ("disk", holding.disk)) if n]
    parts += [f"{device} {format_gb(n)}" for device, n in holding.donor]
    state = "staged" if holding.staged else "reserved"
    return f"{holding.label} ({state}: {', '.join(parts) or 'nothing off the GPU'})"


def _streaming_lines(plan, totals: PlanTotals) -> list[str]:
    compute = plan.compute_device
    lines = [f"  streaming slots on {compute}: {plan.prefetch} x {format_gb(plan.slot_bytes)}; weights on "
             f"{compute}: {format_gb(totals.compute_bytes)} of the model's {format_gb(totals.model_bytes)}"]
    if compute != "cpu":
        decode = f" - {format_gb(totals.decode_bytes)} decode buffer" if totals.decode_bytes else ""
        lines.append(f"  VRAM freed: {_signed_gb(totals.vram_freed_bytes)} ({format_gb(totals.moved_off_bytes)} "
                     f"moved off - {format_gb(totals.slots_bytes)} streaming slots{decode})")
    ram = "RAM" if compute == "cpu" else "pageable RAM"
    held = [f"{format_gb(n)} {what}" for n, what in ((totals.pinned_bytes, "pinned RAM"),
                                                   (totals.pageable_bytes, ram),
                                                   (totals.donor_bytes, "donor VRAM"),
                                                   (totals.disk_bytes, "on disk")) if n]
    lines.append(f"  streamed blocks held in: {', '.join(held)}")
    lines.append(f"  per forward pass: {format_gb(totals.per_pass_bytes)} copied to {compute}")
    if compute != "cpu" and totals.vram_freed_bytes <= 0:
        lines.append(f"  warning: streaming frees no VRAM here: the {plan.prefetch} slots take at least what the "
                     "streamed blocks free; raise virtual_vram_gb to stream more blocks, or set it to 0")
    return lines


def plan_to_dict(plan, label: str | None = None) -> dict:
    """The plan as plain JSON data (str, int, list, dict) for the UI and for tools.

    Blocks are in execution order, each with its tier (a distorch.Tier value); the totals are net
    (PlanTotals). `version` changes when a key changes meaning.
    """
    return {
        "version": PLAN_DICT_VERSION,
        "model": plan.model_name,
        "label": label or plan.model_name,
        "compute_device": plan.compute_device,
        "stream_format": plan.stream_format,
        "stream_note": stream_format_note(plan),
        "prefetch": plan.prefetch,
        "slot_bytes": plan.slot_bytes,
        "rest_bytes": plan.rest_bytes,
        "dtype": {"source": plan.dtype_source, "bytes": {str(k): int(v) for k, v in plan.dtype_bytes.items()},
                  "note": dtype_note(plan)},
        # `bytes` as stored; `stream_bytes` as held and copied (smaller when `format` is not "stored").
        "blocks": [{"name": b.name, "bytes": b.nbytes, "tier": _tier(b), "device": b.device,
                    "reason": getattr(b, "reason", ""), "stream_bytes": _held(b),
                    "format": plan.stream_format if b.decodes else "stored"}
                   for b in plan.blocks],
        "tiers": [{"tier": r.tier, "device": r.device, "role": r.role, "blocks": r.blocks, "bytes": r.nbytes}
                  for r in tier_rows(plan)],
        "totals": asdict(plan_totals(plan)),
        "warnings": list(plan.warnings),
        # How the amount was decided: "fixed" or "auto", the run's budget, the predicted pass and the slots' why.
        "mode": plan.mode,
        "budget": plan.budget.as_dict() if plan.budget is not None else None,
        "schedule": plan.schedule.as_dict() if plan.schedule is not None else None,
        "prefetch_reason": plan.prefetch_reason,
        "streamed_reason": plan.streamed_reason,
        # The ledger's view when the plan was made: what the other DisTorch models hold, what core pinned.
        "ledger": {"others": [_holding_text(h) for h in getattr(plan, "others", ())],
                   "pinned_elsewhere": int(getattr(plan, "pinned_elsewhere", 0)),
                   "ram_added": int(getattr(plan, "ram_added", 0))},
    }


def _tier(block) -> str:
    tier = block.tier
    return getattr(tier, "value", str(tier))


def _role(tier: str, compute: str) -> str:
    if compute == "cpu" and tier in ("pinned_ram", "pageable_ram"):
        return "RAM, streamed"
    return _ROLES.get(tier, f"{tier}, streamed")


def _tier_order(device: str, tier: str) -> tuple[int, str]:
    return (TIER_ORDER.index(tier) if tier in TIER_ORDER else len(TIER_ORDER), device)


def _signed_gb(nbytes: int) -> str:
    return format_gb(nbytes) if nbytes >= 0 else f"-{format_gb(-nbytes)}"
