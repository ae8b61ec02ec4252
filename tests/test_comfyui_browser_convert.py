"""'Convert loaders to DisTorch' in the canvas menu of the real ComfyUI frontend (headless Chromium).

A workflow in ComfyUI-MultiGPU's loader nodes is loaded, the action is picked from the canvas's
right-click menu, and the graph on the canvas then holds the DisTorch loaders with the same node ids,
positions, links and values; queued, it gives core's image. Runs once per ComfyUI install on the
session's server with the frontend that version ships; the browser is tests/browser_harness.py.
"""

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("browser_harness", reason="tests/browser_harness.py (the browser test harness) is not here")
from test_comfyui_multigpu import CORE_FILES, SEPARATE, multigpu_files, run_ok, sd3_prompt  # noqa: E402

pytestmark = pytest.mark.comfyui

MENU_ENTRY = "Convert loaders to DisTorch"
EXPECTED_TYPES = {"1": "DisTorchUNetLoader", "2": "DisTorchCLIPLoader", "3": "DisTorchVAELoader"}


def graph_state(page) -> dict:
    """Each node's type, position and widget values, and the links, as the canvas holds them."""
    return page.page.evaluate("""() => {
        const graph = window.app.graph;
        const nodes = Object.fromEntries(graph.nodes.map((n) => [String(n.id), {
            type: n.type, pos: [Math.round(n.pos[0]), Math.round(n.pos[1])],
            widgets: Object.fromEntries((n.widgets || []).filter((w) => w.name !== "distorch_plan")
                .map((w) => [w.name, w.value])),
        }]));
        const links = graph.serialize().links.map((l) => [l[1], l[2], l[3], l[4], l[5]]);
        return { nodes, links };
    }""")


def open_canvas_menu_and_pick(page, entry: str) -> None:
    """Right-clicks an empty spot of the canvas (no node, no toolbar over it) and clicks `entry` in its menu."""
    spot = page.page.evaluate("""() => {
        const canvas = window.app.canvas, r = canvas.canvas.getBoundingClientRect();
        for (let fy = 0.3; fy < 0.95; fy += 0.05) {
            for (let fx = 0.3; fx < 0.95; fx += 0.05) {
                const x = r.left + r.width * fx, y = r.top + r.height * fy;
                const gx = (x - r.left) / canvas.ds.scale - canvas.ds.offset[0];
                const gy = (y - r.top) / canvas.ds.scale - canvas.ds.offset[1];
                const near = window.app.graph.nodes.some((n) => gx > n.pos[0] - 40 && gx < n.pos[0] + n.size[0] + 40
                    && gy > n.pos[1] - 70 && gy < n.pos[1] + n.size[1] + 40);
                if (!near && document.elementFromPoint(x, y) === canvas.canvas) return { x, y };
            }
        }
        return null;
    }""")
    assert spot, "no empty spot on the canvas to right-click"
    page.page.mouse.click(spot["x"], spot["y"], button="right")
    page.page.locator(".litecontextmenu .litemenu-entry", has_text=entry).first.click()


def test_canvas_menu_converts_multigpu_loaders_and_the_result_runs(comfy_page, server):
    prompt = sd3_prompt(multigpu_files(0.0), *SEPARATE)
    prompt["15"]["inputs"]["filename"] = "browser_converted"
    comfy_page.load_api_workflow(prompt)
    comfy_page.place_in_columns([["1", "2", "3"], ["10", "11", "12"], ["13"], ["14", "15"]])
    comfy_page.fit_view()
    before = graph_state(comfy_page)
    assert {before["nodes"][k]["type"] for k in EXPECTED_TYPES} == {
        "UNETLoaderDisTorch2MultiGPU", "CLIPLoaderDisTorch2MultiGPU", "VAELoaderMultiGPU"}

    open_canvas_menu_and_pick(comfy_page, MENU_ENTRY)
    comfy_page.page.wait_for_function(
        "() => window.app.graph.nodes.filter((n) => n.type.startsWith('DisTorch') && "
        "n.type.endsWith('Loader')).length === 3", timeout=30000)
    after = graph_state(comfy_page)

    assert set(after["nodes"]) == set(before["nodes"])
    assert sorted(after["links"]) == sorted(before["links"])
    for node_id, state in after["nodes"].items():
        assert state["pos"] == before["nodes"][node_id]["pos"], node_id
        if node_id not in EXPECTED_TYPES:
            assert state == before["nodes"][node_id], node_id
    assert {k: after["nodes"][k]["type"] for k in EXPECTED_TYPES} == EXPECTED_TYPES
    unet, clip, vae = (after["nodes"][k]["widgets"] for k in EXPECTED_TYPES)
    assert unet["compute_device"] == "cpu" and unet["virtual_vram_gb"] == 0.0 and "eject_models" not in unet
    assert clip["compute_device"] == "cpu" and clip["type"] == "sd3" and clip["virtual_vram_gb"] == 3.9
    assert vae == {"vae_name": "tiny_taesd3.safetensors", "compute_device": "cpu", "virtual_vram_gb": 0.0,
                   "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False,
                   "stream_format": "stored"}
    assert unet["auto_placement"] is False and clip["auto_placement"] is False, "converted nodes keep their numbers"
    assert not comfy_page.pack_problems(), comfy_page.pack_problems()

    entry = comfy_page.queue_and_wait()
    assert entry.get("status", {}).get("status_str") == "success", str(entry)[:3000]
    core = sd3_prompt(CORE_FILES, *SEPARATE)
    core["15"]["inputs"]["filename"] = "browser_core"
    run_ok(server, core)
    images = [load_file(str(server.base / "output" / f"{n}.safetensors"))["images"]
              for n in ("browser_converted", "browser_core")]
    assert torch.equal(*images)
