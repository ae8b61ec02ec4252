// The DisTorch plan on each loader node: a block map (one cell per block in execution order, coloured by
// tier), a legend, the net totals, and the full plan table on demand. The loader sends the plan with its
// output (nodes/loading.py `plan_model`): `distorch_plan` is distorch.report.plan_to_dict, `text` the table.
// In auto mode each run re-plans the model for its own budget when ComfyUI loads it (nodes/runs.py): the
// server then sends the `distorch.plan` message, and the view (and the virtual_vram_gb widget, which shows the
// amount the last run chose) follow it.
//
// Served from /extensions/<pack>/js/, so the frontend's modules are three folders up. Only app.js and api.js
// are imported: they are the frontend's public API (scripts/widgets.js logs a warning when imported).
import { api } from "../../../scripts/api.js";
import { app } from "../../../scripts/app.js";

const WIDGET = "distorch_plan";
const PLAN_EVENT = "distorch.plan";
const AUTO_SUFFIX = "auto_placement";
// Fixed, so the node never changes size when a plan arrives (no layout jumps in the graph).
// Inside: 3 + 18 + 40 + 26 (a legend of up to two lines) + 4 lines of 14 + 6 gaps of 3 + 3 = 164 px, plus
// the frontend's 10 px margin above and below.
const WIDGET_HEIGHT = 188;
// distorch.Tier values in the order of the legend; Okabe-Ito colours, distinguishable with colour blindness.
const TIERS = [
    { tier: "resident", label: "resident", color: "#009E73" },
    { tier: "pinned_ram", label: "pinned RAM", color: "#0072B2" },
    { tier: "pageable_ram", label: "pageable RAM", color: "#E69F00" },
    { tier: "donor_gpu", label: "donor GPU", color: "#CC79A7" },
    { tier: "disk", label: "disk", color: "#999999" },
];
const UNKNOWN_TIER = { label: "other", color: "#555555" };
const GIB = 1024 ** 3;
const MIB = 1024 ** 2;

const STYLE = `
.distorch-plan { box-sizing: border-box; display: flex; flex-direction: column; gap: 3px; padding: 3px 4px;
  font: 11px/14px sans-serif; color: var(--fg-color, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 6px; overflow: hidden; }
.distorch-plan > * { flex: none; }
.distorch-plan .dt-head { display: flex; align-items: center; gap: 6px; min-height: 18px; }
.distorch-plan .dt-title { flex: 1; font-weight: bold; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.distorch-plan .dt-table { flex: none; font: 11px sans-serif; padding: 1px 6px; cursor: pointer; border-radius: 4px;
  color: var(--fg-color, #ddd); background: var(--comfy-menu-bg, #333); border: 1px solid var(--border-color, #555); }
.distorch-plan .dt-table:disabled { opacity: 0.4; cursor: default; }
.distorch-plan .dt-map { display: grid; gap: 1px; height: 40px; flex: none; }
.distorch-plan .dt-map.dt-empty { border: 1px dashed var(--border-color, #555); border-radius: 3px; }
.distorch-plan .dt-cell { min-width: 0; min-height: 0; border-radius: 1px; }
.distorch-plan .dt-cell:hover { outline: 2px solid var(--fg-color, #fff); outline-offset: -1px; }
.distorch-plan .dt-legend { display: flex; flex-wrap: wrap; gap: 0 8px; font-size: 10px; line-height: 13px; }
.distorch-plan .dt-legend span::before { content: ""; display: inline-block; width: 8px; height: 8px;
  margin-right: 3px; border-radius: 1px; background: var(--swatch); }
.distorch-plan .dt-legend .dt-unused { opacity: 0.4; }
.distorch-plan .dt-line { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.distorch-plan .dt-costly { color: #ff6b6b; }
.distorch-plan .dt-hover { color: var(--descrip-text, #999); }
.distorch-plan-popover { position: fixed; z-index: 10000; display: flex; flex-direction: column; max-width: 92vw;
  max-height: 80vh; color: var(--fg-color, #ddd); background: var(--comfy-menu-bg, #222);
  border: 1px solid var(--border-color, #555); border-radius: 6px; box-shadow: 0 4px 16px rgba(0, 0, 0, 0.5); }
.distorch-plan-popover .dt-pop-head { display: flex; justify-content: space-between; align-items: center; gap: 12px;
  padding: 4px 8px; font: bold 12px sans-serif; border-bottom: 1px solid var(--border-color, #555); }
.distorch-plan-popover button { font: 12px sans-serif; cursor: pointer; color: inherit; background: none; border: none; }
.distorch-plan-popover pre { margin: 0; padding: 8px; overflow: auto; font: 11px/15px monospace; white-space: pre; }
`;

function addStyle() {
    if (document.getElementById("distorch-plan-style")) return;
    const style = document.createElement("style");
    style.id = "distorch-plan-style";
    style.textContent = STYLE;
    document.head.append(style);
}

function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text !== undefined) made.textContent = text;
    return made;
}

function formatGB(bytes) {
    const sign = bytes < 0 ? "-" : "";
    const size = Math.abs(bytes);
    if (size > 0 && size < 0.01 * GIB) return `${sign}${(size / MIB).toFixed(2)} MB`;
    return `${sign}${(size / GIB).toFixed(2)} GB`;
}

function tierOf(name) {
    return TIERS.find((t) => t.tier === name) ?? { ...UNKNOWN_TIER, tier: name, label: name };
}

// Rows of the block map: enough that cells stay wider than a few pixels, at most 4.
function mapRows(count) {
    return count <= 24 ? 1 : count <= 64 ? 2 : count <= 144 ? 3 : 4;
}

class PlanView {
    constructor() {
        this.text = "";
        this.plan = null;
        this.popover = null;
        this.root = element("div", "distorch-plan");
        const head = element("div", "dt-head");
        this.title = element("div", "dt-title", "DisTorch plan: shown after the loader runs");
        this.tableButton = element("button", "dt-table", "table");
        this.tableButton.title = "The full plan table (also in the server log)";
        this.tableButton.disabled = true;
        this.tableButton.addEventListener("click", (event) => {
            event.stopPropagation();
            this.toggleTable();
        });
        head.append(this.title, this.tableButton);
        this.map = element("div", "dt-map dt-empty");
        this.legend = element("div", "dt-legend");
        this.totals = [0, 1, 2].map(() => element("div", "dt-line", "\u00a0"));
        this.hover = element("div", "dt-line dt-hover", "hover a block for its name and size");
        this.root.append(head, this.map, this.legend, ...this.totals, this.hover);
        this.renderLegend(new Set());
    }

    show(plan, text) {
        this.plan = plan ?? null;
        this.text = text ?? "";
        this.tableButton.disabled = !this.text;
        if (this.popover) this.fillTable();
        if (!this.plan) {  // a table without data (an older backend): show its first line, nothing stale
            this.title.textContent = this.text.split("\n", 1)[0] || "DisTorch plan";
            this.map.replaceChildren();
            this.map.classList.add("dt-empty");
            this.totals.forEach((line) => { line.textContent = "\u00a0"; });
            this.renderLegend(new Set());
            return;
        }
        this.renderTitle();
        this.renderMap();
        this.renderLegend(new Set(this.plan.blocks.map((b) => b.tier)));
        this.renderTotals();
    }

    renderTitle() {
        const plan = this.plan;
        const streamed = plan.blocks.filter((b) => b.tier !== "resident").length;
        const mode = plan.mode === "auto" ? " (auto)" : "";
        this.title.textContent = `DisTorch plan${mode}: ${plan.blocks.length} blocks, ${streamed} streamed`;
        const details = [`${plan.label} (${plan.model}) on ${plan.compute_device}`];
        if (plan.budget) {
            details.push(`budget: ${formatGB(plan.budget.weight_bytes)} (${plan.budget.source})`);
            if (plan.budget.activation_bytes != null) {
                details.push(`activations: ${formatGB(plan.budget.activation_bytes)} as ComfyUI estimates them`);
            }
        }
        if (plan.prefetch_reason) details.push(`prefetch: ${plan.prefetch_reason}`);
        this.title.title = details.join("\n");
    }

    renderMap() {
        const blocks = this.plan.blocks;
        const rows = mapRows(blocks.length);
        this.map.replaceChildren();
        this.map.classList.toggle("dt-empty", blocks.length === 0);
        this.map.style.gridTemplateRows = `repeat(${rows}, 1fr)`;
        this.map.style.gridTemplateColumns = `repeat(${Math.max(1, Math.ceil(blocks.length / rows))}, 1fr)`;
        blocks.forEach((block, index) => {
            const tier = tierOf(block.tier);
            const cell = element("div", "dt-cell");
            cell.style.background = tier.color;
            cell.dataset.tier = block.tier;
            const where = block.tier === "resident" ? "" : ` on ${block.device}`;
            const encoded = block.format && block.format !== "stored"
                ? ` (held and copied as ${block.format}: ${formatGB(block.stream_bytes)})` : "";
            cell.title = `${index + 1}. ${block.name}: ${formatGB(block.bytes)}${encoded}, ${tier.label}${where}`;
            cell.addEventListener("mouseenter", () => { this.hover.textContent = cell.title; });
            cell.addEventListener("mouseleave", () => { this.hover.textContent = this.restingHover(); });
            this.map.append(cell);
        });
        if (!blocks.length) this.map.title = "no blocks found: the whole model stays on the compute device";
        this.hover.textContent = this.restingHover();
    }

    restingHover() {
        const dtype = this.plan?.dtype?.note;
        return dtype || "hover a block for its name and size";
    }

    renderLegend(used) {
        this.legend.replaceChildren(...TIERS.map((tier) => {
            const item = element("span", used.has(tier.tier) ? "" : "dt-unused", tier.label);
            item.style.setProperty("--swatch", tier.color);
            return item;
        }));
    }

    renderTotals() {
        const t = this.plan.totals;
        const device = this.plan.compute_device;
        const onCpu = device === "cpu";
        const [freed, held, perStep] = this.totals;
        freed.textContent = onCpu ? "VRAM freed: - (compute on CPU)" : `VRAM freed: ${formatGB(t.vram_freed_bytes)}`;
        freed.title = `Net: ${formatGB(t.moved_off_bytes)} moved off ${device} minus ${formatGB(t.slots_bytes)} of `
            + `streaming slots; weights on ${device}: ${formatGB(t.compute_bytes)} of the model's `
            + `${formatGB(t.model_bytes)}`;
        freed.classList.toggle("dt-costly", !onCpu && t.moved_off_bytes > 0 && t.vram_freed_bytes <= 0);
        const elsewhere = [["donor VRAM", t.donor_bytes], ["disk", t.disk_bytes]]
            .filter(([, bytes]) => bytes > 0).map(([what, bytes]) => ` \u00b7 ${what}: ${formatGB(bytes)}`);
        held.textContent = `RAM used: ${formatGB(t.ram_bytes)}${elsewhere.join("")}`;
        held.title = `pinned ${formatGB(t.pinned_bytes)}, pageable ${formatGB(t.pageable_bytes)}`;
        const saved = t.saved_bytes > 0 ? ` (${this.plan.stream_format}, ${formatGB(t.saved_bytes)} less)` : "";
        perStep.textContent = `per step: ${formatGB(t.per_pass_bytes)} copied to ${device}${saved}`;
        const schedule = this.plan.schedule;
        const predicted = schedule && t.per_pass_bytes > 0
            ? `; predicted ${(schedule.copy_s * 1000).toFixed(0)} ms of copies per pass`
              + (schedule.pass_s != null ? `, ${(schedule.pass_s * 1000).toFixed(0)} ms per pass with compute` : "")
            : "";
        perStep.title = "Bytes copied by each forward pass: one per step when ComfyUI batches cond and uncond, "
            + `two when it runs them separately${predicted}`
            + (this.plan.stream_note ? `. ${this.plan.stream_note}` : "");
    }

    toggleTable() {
        if (this.popover) {
            this.closeTable();
            return;
        }
        this.popover = element("div", "distorch-plan-popover");
        const head = element("div", "dt-pop-head", "");
        head.append(element("span", "", this.plan?.label ?? "DisTorch plan"));
        const close = element("button", "", "\u2715");
        close.title = "Close (Esc)";
        close.addEventListener("click", () => this.closeTable());
        head.append(close);
        this.pre = element("pre", "");
        this.popover.append(head, this.pre);
        this.fillTable();
        document.body.append(this.popover);
        this.placeTable();
        this.onKey = (event) => { if (event.key === "Escape") this.closeTable(); };
        document.addEventListener("keydown", this.onKey);
    }

    fillTable() {
        this.pre.textContent = this.text;
    }

    placeTable() {
        const anchor = this.root.getBoundingClientRect();
        const box = this.popover.getBoundingClientRect();
        const left = Math.min(Math.max(8, anchor.left), window.innerWidth - box.width - 8);
        const below = anchor.bottom + 4;
        const top = below + box.height <= window.innerHeight ? below : Math.max(8, anchor.top - box.height - 4);
        Object.assign(this.popover.style, { left: `${Math.max(8, left)}px`, top: `${top}px` });
    }

    closeTable() {
        this.popover?.remove();
        this.popover = null;
        if (this.onKey) document.removeEventListener("keydown", this.onKey);
        this.onKey = null;
    }
}

function isDisTorchLoader(nodeData) {
    const inputs = { ...nodeData?.input?.required, ...nodeData?.input?.optional };
    // The single-model loaders (and MultiGPU's DisTorch2 ids), or the checkpoint loader's per-part inputs.
    return ("virtual_vram_gb" in inputs && "donor_device" in inputs) ||
        ("unet_virtual_vram_gb" in inputs && "unet_donor_device" in inputs);
}

// A workflow saved before the auto_placement switch existed has no value for it, and the frontend leaves such a
// widget at its default (on): it is switched off here, so the workflow places its models by the amounts it was
// saved with. Widget values are matched by position; only later inputs (stream_format) follow the switch.
function keepSavedAmounts(node, info) {
    const saved = info?.widgets_values;
    if (!saved || typeof saved !== "object") return;
    (node.widgets ?? []).forEach((widget, index) => {
        if (!widget.name?.endsWith(AUTO_SUFFIX)) return;
        const value = Array.isArray(saved) ? saved[index] : saved[widget.name];
        if (typeof value !== "boolean") widget.value = false;
    });
}

// The plan a run chose (auto mode, or a fixed amount that had to stream more), sent while the model loads.
function showRunPlan(detail) {
    const graph = app.graph;
    const node = graph?.getNodeById(Number(detail?.node)) ?? graph?.getNodeById(detail?.node);
    const view = node?.widgets?.find((w) => w.name === WIDGET)?.distorchView;
    if (!view) return;
    view.show(detail.plan, detail.text);
    // The part's amount: `unet_virtual_vram_gb` / `clip_virtual_vram_gb` on the checkpoint loader.
    const amount = node.widgets.find((w) => w.name === (detail.amount_widget ?? "virtual_vram_gb"));
    if (detail.auto && amount) amount.value = detail.virtual_vram_gb;
    node.setDirtyCanvas?.(true, true);
}

function addPlanWidget(node) {
    const view = new PlanView();
    const widget = node.addDOMWidget(WIDGET, "distorch-plan", view.root, {
        serialize: false, // display only: never sent as an input, never saved in widgets_values
        hideOnZoom: true,
        getMinHeight: () => WIDGET_HEIGHT,
        getMaxHeight: () => WIDGET_HEIGHT,
        getValue: () => view.text,
        setValue: (value) => view.show(view.plan, typeof value === "string" ? value : ""),
    });
    widget.serialize = false;
    widget.distorchView = view;
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    const onRemoved = node.onRemoved;
    node.onRemoved = function () {
        view.closeTable();
        return onRemoved?.apply(this, arguments);
    };
    return widget;
}

app.registerExtension({
    name: "distorch.PlanView",
    async setup() {
        addStyle();
        api.addEventListener(PLAN_EVENT, (event) => showRunPlan(event.detail));
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!isDisTorchLoader(nodeData)) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const result = onNodeCreated?.apply(this, arguments);
            addPlanWidget(this);
            return result;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function (info) {
            const result = onConfigure?.apply(this, arguments);
            keepSavedAmounts(this, info);
            return result;
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const widget = this.widgets?.find((w) => w.name === WIDGET);
            if (!widget?.distorchView) return;
            const text = message?.text;
            widget.distorchView.show(message?.distorch_plan?.[0], Array.isArray(text) ? text.join("\n") : text);
            this.setDirtyCanvas?.(true, true);
        };
    },
});
