// "Convert loaders to DisTorch" in the canvas menu: the open workflow's MultiGPU, ComfyUI-GGUF and core loader
// nodes become DisTorch nodes. The server does the rewriting (POST /distorch/convert, the same converter as
// `python -m distorch convert`); this file only sends the graph and loads the answer.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const LABEL = "Convert loaders to DisTorch";

function notify(severity, summary, detail) {
    const toast = app.extensionManager?.toast;
    if (toast?.add) toast.add({ severity, summary, detail, life: 8000 });
    console.log(`[DisTorch] ${summary}: ${detail}`);
}

async function convertLoaders() {
    const response = await api.fetchApi("/distorch/convert", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ workflow: app.graph.serialize() }),
    });
    const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
    if (!response.ok) {
        notify("error", LABEL, answer.error ?? `HTTP ${response.status}`);
        return;
    }
    if (answer.changes.length) await app.loadGraphData(answer.workflow);
    notify(answer.skipped.length ? "warn" : "success", LABEL, answer.report);
}

const menuItem = () => ({
    content: LABEL,
    callback: () => convertLoaders().catch((error) => notify("error", LABEL, String(error))),
});

app.registerExtension({
    name: "distorch.ConvertLoaders",
    // Newer frontends ask extensions for their canvas menu items.
    getCanvasMenuItems() {
        return [null, menuItem()];
    },
    // Older frontends (no app.collectCanvasMenuItems) build the canvas menu in LGraphCanvas.getCanvasMenuOptions.
    setup() {
        if (typeof app.collectCanvasMenuItems === "function") return;
        const canvasClass = globalThis.LGraphCanvas;
        const original = canvasClass?.prototype?.getCanvasMenuOptions;
        if (!original) return;
        canvasClass.prototype.getCanvasMenuOptions = function () {
            const options = original.apply(this, arguments);
            options.push(null, menuItem());
            return options;
        };
    },
});
