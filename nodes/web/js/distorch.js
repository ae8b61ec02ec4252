// Shows the DisTorch plan table on the loader node after it runs (the node returns it as ui.text).
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "distorch_plan";

function showPlan(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        const made = ComfyWidgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app);
        widget = made?.widget;
        if (!widget) return;
        widget.serialize = false; // display only: never part of the saved widgets_values
        if (widget.inputEl) {
            widget.inputEl.readOnly = true;
            widget.inputEl.style.fontFamily = "monospace";
            widget.inputEl.style.fontSize = "10px";
        }
    }
    widget.value = text;
    node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
    name: "distorch.PlanReport",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData?.name?.startsWith("DisTorch")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = message?.text;
            if (text?.length) showPlan(this, Array.isArray(text) ? text.join("\n") : String(text));
        };
    },
});
