"""The pack in the real ComfyUI frontend (headless Chromium): the extension loads without console errors, every
DisTorch loader shows its block map, totals and plan table after a run, staging drives the loader's progress
bar, and a bad allocation string is ComfyUI's error on that node.

Runs once per ComfyUI install, on the session's server (tests/conftest.py) with the frontend that version
ships; the browser is tests/browser_harness.py. Screenshots go to test-artifacts/ (DISTORCH_TEST_ARTIFACTS).
"""

from dataclasses import dataclass

import pytest
from browser_harness import ComfyPage, open_comfy_page

from distorch import MemoryInventory, ModelSizes, plan_sizes
from distorch.headers import read_model_sizes
from distorch.memory import DeviceMemory
from distorch.report import plan_to_dict, plan_totals
from distorch.units import GIB, MIB, format_gb

pytestmark = pytest.mark.comfyui

LOADERS = {"1": "DisTorchUNetLoader", "11": "DisTorchCLIPLoader", "21": "DisTorchVAELoader"}
COLUMNS = [["1", "11", "21"], ["2", "3", "12", "22"], ["5", "13", "23"], ["9", "24"]]  # for readable screenshots


def three_loader_workflow(unet_vram: float, clip_vram: float, expert: str = "") -> dict:
    """The three DisTorch loaders, each feeding a small branch that ends in an output node.

    The virtual VRAM values should be unique to the test: a loader input no other run used makes a fresh
    model, so its blocks are staged (and the progress bar moves) in this run. The frontend rounds them to its
    0.1 GB step; any of them streams every block of the 6 MB Wan model, and 0.1 about half of the CLIP.
    """
    # Fixed amounts: the numbers below decide (an API prompt without auto_placement gets the editor's default).
    distorch = {"compute_device": "cpu", "donor_device": "cpu", "expert_mode_allocations": "", "auto_placement": False}
    return {
        "1": {"class_type": "DisTorchUNetLoader", "inputs": {
            "unet_name": "tiny_wan21.safetensors", "weight_dtype": "default", **distorch,
            "virtual_vram_gb": unet_vram, "expert_mode_allocations": expert}},
        "2": {"class_type": "DisTorchTestZeroConditioning", "inputs": {"tokens": 8, "context_dim": 4096,
                                                                        "pooled_dim": 0}},
        "3": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5,
                                                                   "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0], "seed": 7,
            "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "browser"}},
        "11": {"class_type": "DisTorchCLIPLoader", "inputs": {
            "clip_name": "random_clip_l.safetensors", "type": "stable_diffusion", **distorch,
            "virtual_vram_gb": clip_vram}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": "a lone block is a block"}},
        "13": {"class_type": "DisTorchTestSaveConditioning", "inputs": {"conditioning": ["12", 0],
                                                                         "filename": "browser_cond"}},
        "21": {"class_type": "DisTorchVAELoader", "inputs": {"vae_name": "tiny_taesd.safetensors", **distorch,
                                                              "virtual_vram_gb": 0.0}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "23": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["21", 0]}},
        "24": {"class_type": "DisTorchTestSaveImageTensor", "inputs": {"images": ["23", 0],
                                                                        "filename": "browser_image"}},
    }


_NODE_VIEW = """(id) => {
    const node = window.app.graph.getNodeById(Number(id)) ?? window.app.graph.getNodeById(id);
    const widget = (node.widgets || []).find((w) => w.name === "distorch_plan");
    const root = widget?.element;
    const box = root?.getBoundingClientRect();
    const all = (selector) => (root ? [...root.querySelectorAll(selector)] : []);
    return {
        value: widget ? String(widget.value) : null,
        cells: all(".dt-cell").map((c) => c.dataset.tier),
        titles: all(".dt-cell").map((c) => c.title),
        totals: all(".dt-line").map((l) => l.textContent),
        costly: all(".dt-line.dt-costly").length > 0,
        clipped: all(".dt-title, .dt-line").filter((l) => l.scrollWidth > l.clientWidth + 1).map((l) => l.textContent),
        legend: all(".dt-legend span").map((s) => s.textContent),
        unused: all(".dt-legend span.dt-unused").map((s) => s.textContent),
        visible: !!box && box.width > 0 && box.height > 0,
        overflows: root ? root.scrollHeight > root.clientHeight + 1 : null,
        size: [node.size[0], node.size[1]],
    };
}"""


def node_view(page, node_id: str) -> dict:
    """What a DisTorch loader node shows: its plan widget's value, the block map's cells and the totals."""
    return page.page.evaluate(_NODE_VIEW, node_id)


def loader_views(page) -> dict[str, dict]:
    present = {n["id"] for n in page.nodes()}
    return {node_type: node_view(page, node_id) for node_id, node_type in LOADERS.items() if node_id in present}


@dataclass
class Run:
    """One run of the three-loader workflow through the frontend, shared by the tests of one ComfyUI version."""

    page: ComfyPage
    before: dict  # loader views when the workflow was loaded
    entry: dict  # the history entry of the run
    after: dict  # loader views after the run


@pytest.fixture(scope="module")
def run(browser, server):
    """Loads the workflow through the frontend (as dropping the file does), queues it with the frontend's own
    queue command, and keeps the page (its console and websocket messages) for the tests below."""
    with open_comfy_page(browser, server) as page:
        page.load_api_workflow(three_loader_workflow(unet_vram=0.1, clip_vram=0.1))
        before = loader_views(page)
        entry = page.queue_and_wait()
        page.place_in_columns(COLUMNS)
        page.fit_view()
        after = loader_views(page)
        page.screenshot(f"canvas-{server.install.version}.png")
        yield Run(page, before, entry, after)


def test_the_workflow_runs_and_the_pack_logs_no_errors(run):
    assert set(run.before) == set(LOADERS.values()), f"the frontend did not create every loader: {sorted(run.before)}"
    assert all(v["value"] == "" and not v["cells"] for v in run.before.values()), "no plan before the run"
    assert run.entry.get("status", {}).get("status_str") == "success", str(run.entry)[:3000]
    assert not run.page.pack_problems(), run.page.pack_problems()


@pytest.mark.parametrize("node_type", sorted(LOADERS.values()))
def test_every_loader_shows_its_block_map_and_totals(run, node_type):
    view = run.after[node_type]
    assert "DisTorch plan" in view["value"], f"{node_type}: {view['value'][:200]!r}"
    assert view["visible"] and not view["overflows"], "the plan view is cut off"
    assert not view["clipped"], f"text cut off: {view['clipped']}"
    assert view["cells"], "no block map"
    assert all(title for title in view["titles"]), "blocks without a hover text"
    assert [line.split(":")[0] for line in view["totals"][:3]] == ["VRAM freed", "RAM used", "per step"]
    assert view["legend"] == ["resident", "pinned RAM", "pageable RAM", "donor GPU", "disk"]
    assert view["size"] == run.before[node_type]["size"], "the node changed size when the plan arrived"


def test_the_block_map_shows_each_blocks_tier_and_name(run):
    unet, clip = run.after["DisTorchUNetLoader"], run.after["DisTorchCLIPLoader"]
    assert set(unet["cells"]) == {"pageable_ram"}, "0.1 GB streams every block of the tiny Wan from RAM"
    assert unet["titles"][0].startswith("1. diffusion_model.blocks.0: ")
    assert set(clip["cells"]) == {"resident", "pageable_ram"}, "0.1 GB of the CLIP streams, the rest stays"
    cell = run.page.page.locator(".distorch-plan .dt-cell").nth(2)
    cell.hover()
    hover = run.page.page.locator(".distorch-plan .dt-hover").first.text_content()
    assert hover.startswith("3. diffusion_model.blocks.2: ") and "MB" in hover


def test_staging_moved_the_loaders_progress_bar(run):
    states = [m["data"]["nodes"] for m in run.page.messages if m.get("type") == "progress_state"]
    loader = [s["1"] for s in states if "1" in s]
    running = [s for s in loader if s["state"] == "running"]
    assert running, "the loader node's bar never ran while its blocks were staged"
    assert running[-1]["value"] == running[-1]["max"] and loader[-1]["state"] == "finished"


def test_the_plan_table_opens_on_demand_in_full(run):
    page = run.page.page
    page.locator(".distorch-plan .dt-table").first.click()
    table = page.locator(".distorch-plan-popover pre")
    assert table.text_content().startswith("DisTorch plan for tiny_wan21.safetensors")
    assert table.evaluate("(pre) => pre.scrollWidth <= pre.clientWidth + 1"), "the table must not be cut off"
    run.page.screenshot(f"table-{run.page.server.install.version}.png")
    page.keyboard.press("Escape")
    assert page.locator(".distorch-plan-popover").count() == 0


def test_the_plan_is_neither_saved_nor_sent_and_a_second_run_reuses_the_loaders(run):
    """The plan widget is display only: it must not become a loader input (the table would change the loader's
    cache key after every run, so each queue would load the model again) nor a saved widget value."""
    prompt = run.page.page.evaluate("""async () => {
        const { output, workflow } = await window.app.graphToPrompt();
        return { inputs: Object.fromEntries(Object.entries(output).map(([id, n]) => [id, Object.keys(n.inputs)])),
                 saved: Object.fromEntries(workflow.nodes.map((n) => [String(n.id), n.widgets_values])) };
    }""")
    for node_id, node_type in LOADERS.items():
        assert "distorch_plan" not in prompt["inputs"][node_id], node_type
        assert not any("DisTorch plan" in str(v) for v in prompt["saved"][node_id]), node_type
    before = len(run.page.messages)
    entry = run.page.queue_and_wait()
    assert entry.get("status", {}).get("status_str") == "success", str(entry)[:2000]
    cached = {n for m in run.page.messages[before:] if m.get("type") == "execution_cached" for n in m["data"]["nodes"]}
    assert set(LOADERS) <= cached, f"loaders ran again: cached {sorted(cached)}"


def flux_dev_sizes() -> ModelSizes:
    """FLUX.1-dev in bf16, block by block (hidden 3072, MLP 12288: 339.8M parameters per double block,
    141.6M per single block, 64.1M outside the blocks; 22.17 GiB in all, the size of flux1-dev.safetensors)."""
    hidden, mlp = 3072, 12288

    def linear(inputs, outputs):
        return inputs * outputs + outputs

    stream = linear(hidden, 6 * hidden) + linear(hidden, 3 * hidden) + 256 + linear(hidden, hidden) + \
        linear(hidden, mlp) + linear(mlp, hidden)
    single = linear(hidden, 3 * hidden + mlp) + linear(hidden + mlp, hidden) + linear(hidden, 3 * hidden) + 256
    rest = linear(64, hidden) + 2 * (linear(256, hidden) + linear(hidden, hidden)) + linear(768, hidden) + \
        linear(hidden, hidden) + linear(4096, hidden) + linear(hidden, 64) + linear(hidden, 2 * hidden)
    blocks = tuple((f"diffusion_model.double_blocks.{i}", 2 * 2 * stream) for i in range(19)) + tuple(
        (f"diffusion_model.single_blocks.{i}", 2 * single) for i in range(38))
    total = sum(n for _, n in blocks) + 2 * rest
    return ModelSizes("Flux", blocks, 2 * rest, dtype_bytes={"bf16": total}, dtype_source="model")


def show_plan(page, plan, label: str, pos: tuple[float, float], inputs: dict) -> str:
    """A new loader node on the canvas, set to `inputs`, that received `plan` as if it had run (onExecuted)."""
    data = plan_to_dict(plan, label)
    text = plan.report().replace(f"DisTorch plan for {plan.model_name}", f"DisTorch plan for {label} (Flux)", 1)
    return page.page.evaluate("""([text, data, pos, inputs]) => {
        const node = window.LiteGraph.createNode("DisTorchUNetLoader");
        node.pos = pos;
        window.app.graph.add(node);
        for (const widget of node.widgets) {
            if (widget.name in inputs) widget.value = inputs[widget.name];
        }
        node.onExecuted({ text: [text], distorch_plan: [data] });
        return String(node.id);
    }""", [text, data, list(pos), inputs])


def gpu_memory(vram_gb: float, ram_gb: float, pinned_gb: float, donor_gb: float = 0.0) -> MemoryInventory:
    devices = {"cuda:0": DeviceMemory("cuda:0", int((vram_gb - 0.8) * GIB), int(vram_gb * GIB)),
               "cpu": DeviceMemory("cpu", int(0.7 * ram_gb * GIB), int(ram_gb * GIB))}
    if donor_gb:
        devices["cuda:1"] = DeviceMemory("cuda:1", int(donor_gb * GIB), int(donor_gb * GIB))
    return MemoryInventory(devices, int(pinned_gb * GIB))


def test_a_gpu_plan_draws_every_tier_and_net_totals(run):
    """The plans a CPU machine cannot make: FLUX.1-dev on a 12 GB card (pinned and pageable RAM), and with a
    donor GPU; drawn by the real frontend as the loader would show them after a run."""
    page = run.page
    single = plan_sizes(flux_dev_sizes(), compute_device="cuda:0", virtual_vram_gb=14,
                        memory=gpu_memory(12, 64, pinned_gb=10))
    donor = plan_sizes(flux_dev_sizes(), compute_device="cuda:0", virtual_vram_gb=14, donor_device="cuda:1",
                       memory=gpu_memory(12, 64, pinned_gb=32, donor_gb=8))
    tiny = plan_sizes(flux_dev_sizes(), compute_device="cuda:0", virtual_vram_gb=0.6,
                      memory=gpu_memory(32, 64, pinned_gb=32))
    right = max(n["pos"][0] + n["size"][0] for n in page.nodes()) + 80
    inputs = [{"virtual_vram_gb": 14.0}, {"virtual_vram_gb": 14.0, "donor_device": "cuda:1"},
              {"virtual_vram_gb": 0.6}]
    ids = [show_plan(page, plan, "flux1-dev.safetensors", (right + 360 * i, 40),
                     {"unet_name": "flux1-dev.safetensors", "compute_device": "cuda:0", **extra})
           for i, (plan, extra) in enumerate(zip((single, donor, tiny), inputs))]
    page.close_dialogs()
    page.page.evaluate("""(id) => {
        document.querySelectorAll(".p-toast-message").forEach((toast) => toast.remove());
        const canvas = window.app.canvas;
        const node = window.app.graph.getNodeById(Number(id));
        canvas.ds.scale = 1.5;
        canvas.ds.offset = [160 / 1.5 - node.pos[0], 300 / 1.5 - node.pos[1]];  // clear of the toolbars
        canvas.setDirty(true, true);
    }""", ids[0])
    page.page.wait_for_timeout(500)
    page.screenshot(f"plan-{page.server.install.version}.png", clip=page.node_screen_box(ids[0], margin=26))

    views = [node_view(page, node_id) for node_id in ids]
    for plan, view in zip((single, donor, tiny), views):
        assert view["cells"] == [b.tier.value for b in plan.blocks]
        assert "DisTorch plan for flux1-dev.safetensors" in view["value"]
        assert not view["overflows"] and not view["clipped"], view["clipped"]
    assert set(views[0]["cells"]) == {"resident", "pinned_ram", "pageable_ram"}
    assert views[0]["totals"][:2] == [f"VRAM freed: {format_gb(plan_totals(single).vram_freed_bytes)}",
                                      f"RAM used: {format_gb(plan_totals(single).ram_bytes)}"]
    assert views[0]["unused"] == ["donor GPU", "disk"] and not views[0]["costly"]
    assert "donor_gpu" in views[1]["cells"] and "donor VRAM: 7.23 GB" in views[1]["totals"][1]
    assert plan_totals(tiny).vram_freed_bytes < 0 and views[2]["costly"], "a plan that costs VRAM is flagged"
    assert views[2]["totals"][0].startswith("VRAM freed: -0.6")


def test_an_auto_loader_shows_the_plan_its_run_chose(comfy_page, server):
    """In auto mode the plan is made when the sampler loads the model, for that run's budget: the server sends it to
    the loader node, whose view shows it and whose virtual_vram_gb shows the amount the run streamed. The run is on
    a simulated GPU (tests/comfyui/distorch_test_nodes): under --cpu core sets no budget."""
    sizes = read_model_sizes(str(server.base / "models" / "diffusion_models" / "tiny_wan21.safetensors"))
    block, rest = 2 * max(n for _, n in sizes.blocks), 2 * sizes.rest_bytes  # bf16 file, fp32 on the CPU
    vram = (int(0.8 * GIB) + 400 * MIB + rest + 3.5 * block) / GIB  # core's floor, the rest, 1.5 blocks, 2 slots
    prompt = three_loader_workflow(unet_vram=0.0, clip_vram=0.0)
    prompt["1"]["inputs"].update(auto_placement=True, virtual_vram_gb=0.0)
    prompt["6"] = {"class_type": "DisTorchTestSimulatedGpu", "inputs": {"model": ["1", 0], "vram_gb": vram,
                                                                        "bytes_per_cell": 1.0}}
    prompt["5"]["inputs"]["model"] = ["6", 0]
    comfy_page.load_api_workflow(prompt)
    entry = comfy_page.queue_and_wait()
    assert entry.get("status", {}).get("status_str") == "success", str(entry)[:3000]
    plans = [m["data"] for m in comfy_page.messages if m.get("type") == "distorch.plan"]
    assert plans and plans[-1]["node"] == "1" and plans[-1]["auto"], plans
    chosen = plans[-1]["virtual_vram_gb"]
    view = node_view(comfy_page, "1")
    assert "pageable_ram" in view["cells"] and "resident" in view["cells"], view["cells"]
    amount = comfy_page.page.evaluate("""() => window.app.graph.getNodeById(1).widgets
        .find((w) => w.name === "virtual_vram_gb").value""")
    assert plans[-1]["plan"]["totals"]["moved_off_bytes"] > 0 and amount == chosen, (amount, chosen)  # GB, 2 places
    title = comfy_page.page.evaluate("() => document.querySelector('.distorch-plan .dt-title').textContent")
    assert title.startswith("DisTorch plan (auto): 4 blocks"), title
    assert not comfy_page.pack_problems(), comfy_page.pack_problems()


def test_an_auto_checkpoint_loader_shows_the_chosen_amount_in_that_parts_widget(comfy_page, server):
    """The checkpoint loader has an amount per part: the plan a run chose for the diffusion model (auto) lands in
    `unet_virtual_vram_gb`; the text encoders' fixed amount stays as typed. Simulated card too small for any block
    to stay: every block of the diffusion model streams."""
    loader = {"class_type": "DisTorchCheckpointLoader", "inputs": {
        "ckpt_name": "tiny_sd3_checkpoint.safetensors", "unet_compute_device": "cpu", "unet_virtual_vram_gb": 5.0,
        "unet_donor_device": "cpu", "clip_compute_device": "cpu", "clip_virtual_vram_gb": 3.0,
        "clip_donor_device": "cpu", "vae_device": "cpu", "unet_expert_mode_allocations": "",
        "clip_expert_mode_allocations": "", "unet_auto_placement": True, "clip_auto_placement": False,
        "stream_format": "stored"}}
    prompt = {
        "1": loader,
        "6": {"class_type": "DisTorchTestSimulatedGpu", "inputs": {"model": ["1", 0], "vram_gb": 1.0,
                                                                   "bytes_per_cell": 1.0}},
        "10": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse"}},
        "12": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "13": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "positive": ["10", 0], "negative": ["10", 0], "latent_image": ["12", 0], "seed": 11,
            "steps": 1, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "15": {"class_type": "SaveLatent", "inputs": {"samples": ["13", 0], "filename_prefix": "browser_ckpt"}},
    }
    comfy_page.load_api_workflow(prompt)
    entry = comfy_page.queue_and_wait()
    assert entry.get("status", {}).get("status_str") == "success", str(entry)[:3000]
    plans = [m["data"] for m in comfy_page.messages if m.get("type") == "distorch.plan" and m["data"]["node"] == "1"]
    unet = [p for p in plans if p["amount_widget"] == "unet_virtual_vram_gb"]
    assert unet and unet[-1]["auto"] and unet[-1]["plan"]["totals"]["moved_off_bytes"] > 0, plans
    assert all(not p["auto"] for p in plans if p["amount_widget"] == "clip_virtual_vram_gb"), plans
    amounts = comfy_page.page.evaluate("""() => Object.fromEntries(window.app.graph.getNodeById(1).widgets
        .filter((w) => w.name.endsWith("virtual_vram_gb")).map((w) => [w.name, w.value]))""")
    assert amounts == {"unet_virtual_vram_gb": unet[-1]["virtual_vram_gb"], "clip_virtual_vram_gb": 3.0}, amounts
    assert not comfy_page.pack_problems(), comfy_page.pack_problems()


def test_a_bad_allocation_is_comfyuis_error_on_that_node(run):  # last: it replaces the workflow
    page = run.page
    page.load_api_workflow(three_loader_workflow(unet_vram=0.1, clip_vram=0.1, expert="cuda:0,1.5t;cpu,*"))
    errors = page.queue_expecting_node_errors()
    assert list(errors) == ["1"], errors
    assert "unknown unit 't'" in str(errors["1"])
    # Drawn as ComfyUI draws a node error: `has_errors` (newer frontends) or the red nodeError outline (older).
    marked = page.page.evaluate("""() => {
        const node = window.app.graph.getNodeById(1);
        return node.has_errors === true || node.strokeStyles?.nodeError?.call(node)?.color === "red";
    }""")
    assert marked, "the loader is not marked as the node in error"
    page.place_in_columns(COLUMNS)
    page.fit_view()
    page.screenshot(f"error-{page.server.install.version}.png")
    assert not page.pack_problems(), page.pack_problems()
