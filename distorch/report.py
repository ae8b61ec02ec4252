"""Renders a plan as the table users see in the log, on the node and in the CLI."""

from dataclasses import dataclass

from .units import format_gb


@dataclass(frozen=True)
class TierRow:
    """One line of the plan table: a device and how its blocks are used."""

    device: str
    role: str
    blocks: int
    nbytes: int
    vram_freed: int


def tier_rows(plan) -> list[TierRow]:
    """Per tier: resident (compute), donor GPU, pinned RAM, pageable RAM; empty tiers left out."""
    compute = plan.compute_device
    rows = [TierRow(compute, "resident", sum(not b.streamed for b in plan.blocks), plan.resident_bytes, 0)]
    groups: dict[tuple[str, str], list] = {}
    for block in plan.blocks:
        if block.streamed:
            groups.setdefault((block.device, _role(block, compute)), []).append(block)
    for (device, role), blocks in sorted(groups.items(), key=lambda item: _tier_order(item[0])):
        nbytes = sum(b.nbytes for b in blocks)
        rows.append(TierRow(device, role, len(blocks), nbytes, nbytes if compute != "cpu" else 0))
    return rows


def format_report(plan) -> str:
    compute = plan.compute_device
    lines = [
        f"DisTorch plan for {plan.model_name}: {format_gb(plan.resident_bytes + plan.streamed_bytes)} "
        f"({len(plan.blocks)} blocks + {format_gb(plan.rest_bytes)} other weights), compute on {compute}",
        f"  {'device':<8} {'tier':<26} {'blocks':>6} {'weights':>10} {'VRAM freed':>11}",
    ]
    for row in tier_rows(plan):
        freed = format_gb(row.vram_freed) if row.vram_freed else "-"
        lines.append(f"  {row.device:<8} {row.role:<26} {row.blocks:>6} {format_gb(row.nbytes):>10} {freed:>11}")
    lines.extend(_reason_lines(plan))
    if plan.streamed:
        lines.append(f"  streaming slots on {compute}: {plan.prefetch} x {format_gb(plan.slot_bytes)}; weights on "
                     f"{compute}: {format_gb(plan.compute_bytes)} of the model's "
                     f"{format_gb(plan.resident_bytes + plan.streamed_bytes)}")
        lines.append(f"  per forward pass: {format_gb(plan.streamed_bytes)} copied to {compute}")
    lines.append(_ledger_line(plan))
    lines.extend(f"  warning: {w}" for w in plan.warnings)
    return "\n".join(lines)


def _reason_lines(plan) -> list[str]:
    """Why the streamed blocks got their tiers: one line per (tier, reason), with the block count."""
    counts: dict[tuple[str, str], int] = {}
    for block in plan.blocks:
        if block.streamed and block.reason:
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


def _role(block, compute: str) -> str:
    if block.device != "cpu":
        return "donor GPU, streamed"
    if block.disk:
        return "disk (file mapping), streamed"
    if compute == "cpu":
        return "RAM, streamed"
    return "pinned RAM, streamed" if block.pinned else "pageable RAM, streamed (slow)"


def _tier_order(key: tuple[str, str]) -> tuple[int, str, str]:
    device, role = key
    return (1 if device == "cpu" else 0, device, role)
