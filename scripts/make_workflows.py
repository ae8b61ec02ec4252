"""Writes the example workflows in workflows/: UI format (drag into ComfyUI) and the API-format twin.

    python scripts/make_workflows.py

The graphs are described once here; node signatures come from distorch/catalog.py (DisTorch nodes) and
tests/data/core_nodes.json (core nodes, recorded from ComfyUI 0.3.64, 0.8.0 and 0.33.0), so both formats
always agree and tests/test_workflows.py can check them.

A workflow whose core nodes are newer than 0.3.64 declares the oldest ComfyUI it needs in MIN_COMFYUI; the UI
file carries it as `extra.distorch.min_comfyui` (the frontend keeps unknown `extra` keys). The integration suite
validates each API twin on every ComfyUI at least that new and checks that older ones really lack something.
"""

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distorch.catalog import LATER_INPUTS, NODE_TITLES, output_types, widget_inputs  # noqa: E402

CORE = json.loads((ROOT / "tests" / "data" / "core_nodes.json").read_text())
# Room for the plan view the web extension adds to every DisTorch loader (nodes/web/js/distorch.js WIDGET_HEIGHT),
# so loading a workflow does not grow a loader over the node below it.
PLAN_VIEW_HEIGHT = 192
TITLE_HEIGHT, NODE_GAP = 30, 30
OLDEST_COMFYUI = "0.3.64"  # the oldest ComfyUI the pack supports


@dataclass(frozen=True)
class Link:
    node: int
    slot: int = 0


def signature(class_type: str) -> dict:
    if class_type in NODE_TITLES:
        names = widget_inputs(class_type)
        inputs = [{"name": n, "type": next((t for suffix, t in _DISTORCH_TYPES.items() if n.endswith(suffix)), "COMBO"),
                   "widget": True, "control_after_generate": False,
                   "optional": n.endswith(("expert_mode_allocations", "auto_placement")) or n in LATER_INPUTS}
                  for n in names]
        return {"inputs": inputs, "outputs": list(output_types(class_type))}
    return CORE[class_type]


_DISTORCH_TYPES = {"virtual_vram_gb": "FLOAT", "expert_mode_allocations": "STRING", "auto_placement": "BOOLEAN"}


def distorch(gb: float, compute: str = "cuda:0", donor: str = "cpu", expert: str = "", auto: bool = True) -> dict:
    """A DisTorch loader's inputs. The examples run in auto mode (each run places the model for its own budget);
    `gb` is what the loader falls back to with auto_placement switched off."""
    return {"compute_device": compute, "virtual_vram_gb": gb, "donor_device": donor, "expert_mode_allocations": expert,
            "auto_placement": auto, **LATER_INPUTS}


def api_format(graph: list) -> dict:
    prompt = {}
    for node_id, class_type, values, _ in graph:
        inputs = {k: ([str(v.node), v.slot] if isinstance(v, Link) else v) for k, v in values.items()}
        prompt[str(node_id)] = {"class_type": class_type, "inputs": inputs,
                                "_meta": {"title": NODE_TITLES.get(class_type, class_type)}}
    return prompt


def ui_format(graph: list, min_comfyui: str = OLDEST_COMFYUI) -> dict:
    links, by_origin = [], {}
    for node_id, class_type, values, _ in graph:
        sockets = [s for s in signature(class_type)["inputs"] if not s["widget"]]
        for target_slot, spec in enumerate(sockets):
            source = values.get(spec["name"])
            if isinstance(source, Link):
                link_id = len(links) + 1
                links.append([link_id, source.node, source.slot, node_id, target_slot, spec["type"]])
                by_origin.setdefault((source.node, source.slot), []).append(link_id)
    nodes = _stack_columns([_ui_node(order, entry, links, by_origin) for order, entry in enumerate(graph)])
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}, "distorch": {"min_comfyui": min_comfyui}}, "version": 0.4}


def _ui_node(order: int, entry, links: list, by_origin: dict) -> dict:
    node_id, class_type, values, pos = entry
    spec = signature(class_type)
    inputs = []
    for s in (s for s in spec["inputs"] if not s["widget"]):
        link = next((entry[0] for entry in links if entry[3] == node_id and entry[4] == len(inputs)), None)
        inputs.append({"name": s["name"], "type": s["type"], "link": link})
    widgets = []
    for s in (s for s in spec["inputs"] if s["widget"]):
        widgets.append(values[s["name"]])
        if s["control_after_generate"]:
            widgets.append("fixed")
        if s.get("upload"):
            widgets.append("image")  # what the frontend saves for LoadImage's upload button
    outputs = [{"name": kind, "type": kind, "links": by_origin.get((node_id, slot), []), "slot_index": slot}
               for slot, kind in enumerate(spec["outputs"])]
    height = 60 + 26 * (len(widgets) + len(inputs)) + (PLAN_VIEW_HEIGHT if class_type in NODE_TITLES else 0)
    return {"id": node_id, "type": class_type, "pos": list(pos), "size": [360, height],
            "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
            "title": NODE_TITLES.get(class_type, class_type),
            "properties": {"Node name for S&R": class_type}, "widgets_values": widgets}


def _stack_columns(nodes: list) -> list:
    """Moves nodes down where the one above in their column would overlap them (title bars included)."""
    for column in {n["pos"][0] for n in nodes}:
        below = 0
        for node in sorted((n for n in nodes if n["pos"][0] == column), key=lambda n: n["pos"][1]):
            node["pos"][1] = max(node["pos"][1], below)
            below = node["pos"][1] + node["size"][1] + TITLE_HEIGHT + NODE_GAP
    return nodes


def sampler(model, positive, negative, latent, steps, cfg, sampler_name="euler", scheduler="simple"):
    return {"model": model, "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler_name,
            "scheduler": scheduler, "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}


def flux_gguf() -> list:
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "flux1-dev-Q8_0.gguf", "weight_dtype": "default", **distorch(6.0)},
         (0, 0)),
        (2, "DisTorchDualCLIPLoader", {"clip_name1": "t5-v1_1-xxl-encoder-Q8_0.gguf",
                                       "clip_name2": "clip_l.safetensors", "type": "flux", **distorch(0.0)}, (0, 330)),
        (3, "CLIPTextEncode", {"text": "a red fox in fresh snow at golden hour, 35mm photograph", "clip": Link(2)},
         (420, 330)),
        (4, "FluxGuidance", {"conditioning": Link(3), "guidance": 3.5}, (840, 240)),
        (5, "ConditioningZeroOut", {"conditioning": Link(3)}, (840, 420)),
        (6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (840, 560)),
        (7, "KSampler", sampler(Link(1), Link(4), Link(5), Link(6), steps=20, cfg=1.0), (1260, 0)),
        (8, "DisTorchVAELoader", {"vae_name": "ae.safetensors", **distorch(0.0)}, (1260, 520)),
        (9, "VAEDecode", {"samples": Link(7), "vae": Link(8)}, (1680, 0)),
        (10, "SaveImage", {"images": Link(9), "filename_prefix": "DisTorch_flux"}, (1680, 160)),
    ]


def wan22_t2v() -> list:
    advanced = {"cfg": 3.5, "sampler_name": "euler", "scheduler": "simple", "steps": 20, "noise_seed": 42,
                "positive": Link(6), "negative": Link(7), }
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "wan2.2_t2v_high_noise_14B_fp16.safetensors", "weight_dtype": "default",
                                   **distorch(20.0)}, (0, 0)),
        (2, "DisTorchUNetLoader", {"unet_name": "wan2.2_t2v_low_noise_14B_fp16.safetensors", "weight_dtype": "default",
                                   **distorch(20.0)}, (0, 330)),
        (3, "ModelSamplingSD3", {"model": Link(1), "shift": 8.0}, (420, 0)),
        (4, "ModelSamplingSD3", {"model": Link(2), "shift": 8.0}, (420, 330)),
        (5, "DisTorchCLIPLoader", {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan",
                                   **distorch(0.0)}, (0, 660)),
        (6, "CLIPTextEncode", {"text": "a corgi runs along a beach at sunset, waves splashing, slow motion",
                               "clip": Link(5)}, (420, 560)),
        (7, "CLIPTextEncode", {"text": "blurry, low quality, static, distorted, watermark", "clip": Link(5)},
         (420, 760)),
        (8, "EmptyHunyuanLatentVideo", {"width": 832, "height": 480, "length": 81, "batch_size": 1}, (840, 760)),
        (9, "KSamplerAdvanced", {"model": Link(3), "add_noise": "enable", "latent_image": Link(8), "start_at_step": 0,
                                 "end_at_step": 10, "return_with_leftover_noise": "enable", **advanced}, (840, 0)),
        (10, "KSamplerAdvanced", {"model": Link(4), "add_noise": "disable", "latent_image": Link(9),
                                  "start_at_step": 10, "end_at_step": 10000, "return_with_leftover_noise": "disable",
                                  **advanced}, (1260, 0)),
        (11, "DisTorchVAELoader", {"vae_name": "wan_2.1_vae.safetensors", **distorch(0.0)}, (1260, 560)),
        (12, "VAEDecode", {"samples": Link(10), "vae": Link(11)}, (1680, 0)),
        (13, "SaveAnimatedWEBP", {"images": Link(12), "filename_prefix": "DisTorch_wan22", "fps": 16.0,
                                  "lossless": False, "quality": 90, "method": "default"}, (1680, 160)),
    ]


def wan22_t2v_gguf() -> list:
    """Wan 2.2 from GGUF files only: both experts and the UMT5 text encoder (its tokenizer comes from the file)."""
    graph = wan22_t2v()
    names = {1: "Wan2.2-T2V-A14B-HighNoise-Q4_K_M.gguf", 2: "Wan2.2-T2V-A14B-LowNoise-Q4_K_M.gguf",
             5: "umt5-xxl-encoder-Q8_0.gguf"}
    for index, (node_id, class_type, values, pos) in enumerate(graph):
        if node_id in (1, 2):
            values = {**values, "unet_name": names[node_id], **distorch(6.0)}
        elif node_id == 5:
            values = {**values, "clip_name": names[node_id]}
        elif class_type == "SaveAnimatedWEBP":
            values = {**values, "filename_prefix": "DisTorch_wan22_gguf"}
        graph[index] = (node_id, class_type, values, pos)
    return graph


def hunyuan_video() -> list:
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "hunyuan_video_t2v_720p_bf16.safetensors", "weight_dtype": "default",
                                   **distorch(12.0)}, (0, 0)),
        (2, "ModelSamplingSD3", {"model": Link(1), "shift": 7.0}, (420, 0)),
        (3, "DisTorchDualCLIPLoader", {"clip_name1": "clip_l.safetensors",
                                       "clip_name2": "llava_llama3_fp8_scaled.safetensors", "type": "hunyuan_video",
                                       **distorch(0.0)}, (0, 330)),
        (4, "CLIPTextEncode", {"text": "a paper boat drifting down a rainy city gutter, macro, cinematic",
                               "clip": Link(3)}, (420, 330)),
        (5, "FluxGuidance", {"conditioning": Link(4), "guidance": 6.0}, (840, 240)),
        (6, "ConditioningZeroOut", {"conditioning": Link(4)}, (840, 420)),
        (7, "EmptyHunyuanLatentVideo", {"width": 848, "height": 480, "length": 73, "batch_size": 1}, (840, 560)),
        (8, "KSampler", sampler(Link(2), Link(5), Link(6), Link(7), steps=20, cfg=1.0), (1260, 0)),
        (9, "DisTorchVAELoader", {"vae_name": "hunyuan_video_vae_bf16.safetensors", **distorch(0.0)}, (1260, 520)),
        (10, "VAEDecodeTiled", {"samples": Link(8), "vae": Link(9), "tile_size": 256, "overlap": 64,
                                "temporal_size": 64, "temporal_overlap": 8}, (1680, 0)),
        (11, "SaveAnimatedWEBP", {"images": Link(10), "filename_prefix": "DisTorch_hunyuan", "fps": 24.0,
                                  "lossless": False, "quality": 90, "method": "default"}, (1680, 220)),
    ]


def sd35_large() -> list:
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "sd3.5_large.safetensors", "weight_dtype": "default", **distorch(8.0)},
         (0, 0)),
        (2, "ModelSamplingSD3", {"model": Link(1), "shift": 3.0}, (420, 0)),
        (3, "DisTorchTripleCLIPLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors",
                                         "clip_name3": "t5xxl_fp16.safetensors", **distorch(4.0)}, (0, 330)),
        (4, "CLIPTextEncode", {"text": "an isometric watercolor of a lighthouse on a cliff, crisp details",
                               "clip": Link(3)}, (420, 330)),
        (5, "CLIPTextEncode", {"text": "blurry, lowres, jpeg artifacts", "clip": Link(3)}, (420, 530)),
        (6, "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (840, 560)),
        (7, "KSampler", sampler(Link(2), Link(4), Link(5), Link(6), steps=28, cfg=4.5, sampler_name="dpmpp_2m",
                                scheduler="sgm_uniform"), (840, 0)),
        (8, "DisTorchVAELoader", {"vae_name": "sd3.5_vae.safetensors", **distorch(0.0)}, (1260, 520)),
        (9, "VAEDecode", {"samples": Link(7), "vae": Link(8)}, (1260, 0)),
        (10, "SaveImage", {"images": Link(9), "filename_prefix": "DisTorch_sd35"}, (1680, 0)),
    ]


def ltx2_t2v_gguf() -> list:
    """LTX-2 text to video with sound, one stage of core's template (video_ltx2_t2v): the diffusion model and the
    Gemma 3 12B text encoder from GGUF files. Core's LTXAVTextEncoderLoader takes the text projection from the full
    checkpoint; with a GGUF diffusion model it comes from the separate embeddings-connector file as the second file
    of the dual loader (type ltxv), the video and audio VAEs from their own files."""
    frames, fps = 97, 25
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "ltx-2-19b-dev-Q4_K_M.gguf", "weight_dtype": "default",
                                   **distorch(8.0)}, (0, 0)),
        (2, "DisTorchDualCLIPLoader", {"clip_name1": "gemma-3-12b-it-Q4_K_M.gguf",
                                       "clip_name2": "ltx-2-19b-embeddings_connector_dev_bf16.safetensors",
                                       "type": "ltxv", **distorch(4.0)}, (0, 330)),
        (3, "CLIPTextEncode", {"text": "A lighthouse keeper climbs a spiral staircase at dusk, lantern swinging, "
                                       "wind howling outside; he hums a slow sea shanty. Handheld camera follows.",
                               "clip": Link(2)}, (420, 0)),
        (4, "CLIPTextEncode", {"text": "blurry, low quality, still frame, frames, watermark, overlay, titles, "
                                       "has blurbox, has subtitles", "clip": Link(2)}, (420, 200)),
        (5, "LTXVConditioning", {"positive": Link(3), "negative": Link(4), "frame_rate": float(fps)}, (840, 0)),
        (6, "LTXVAudioVAELoader", {"ckpt_name": "LTX2_audio_vae_bf16.safetensors"}, (0, 700)),
        (7, "EmptyLTXVLatentVideo", {"width": 768, "height": 512, "length": frames, "batch_size": 1}, (420, 400)),
        (8, "LTXVEmptyLatentAudio", {"audio_vae": Link(6), "frames_number": frames, "frame_rate": fps,
                                     "batch_size": 1}, (420, 600)),
        (9, "LTXVConcatAVLatent", {"video_latent": Link(7), "audio_latent": Link(8)}, (840, 400)),
        (10, "CFGGuider", {"model": Link(1), "positive": Link(5, 0), "negative": Link(5, 1), "cfg": 4.0}, (840, 200)),
        (11, "RandomNoise", {"noise_seed": 42}, (840, 560)),
        (12, "KSamplerSelect", {"sampler_name": "euler_ancestral"}, (840, 700)),
        (13, "LTXVScheduler", {"steps": 20, "max_shift": 2.05, "base_shift": 0.95, "stretch": True, "terminal": 0.1,
                               "latent": Link(9)}, (840, 840)),
        (14, "SamplerCustomAdvanced", {"noise": Link(11), "guider": Link(10), "sampler": Link(12), "sigmas": Link(13),
                                       "latent_image": Link(9)}, (1260, 0)),
        (15, "LTXVSeparateAVLatent", {"av_latent": Link(14)}, (1260, 220)),
        (16, "DisTorchVAELoader", {"vae_name": "LTX2_video_vae_bf16.safetensors", **distorch(0.0)}, (1260, 380)),
        (17, "VAEDecodeTiled", {"samples": Link(15, 0), "vae": Link(16), "tile_size": 512, "overlap": 64,
                                "temporal_size": 4096, "temporal_overlap": 8}, (1680, 0)),
        (18, "LTXVAudioVAEDecode", {"samples": Link(15, 1), "audio_vae": Link(6)}, (1680, 260)),
        (19, "CreateVideo", {"images": Link(17), "audio": Link(18), "fps": float(fps)}, (2100, 0)),
        (20, "SaveVideo", {"video": Link(19), "filename_prefix": "video/DisTorch_ltx2", "format": "auto",
                           "codec": "auto"}, (2100, 200)),
    ]


def flux2_dev_gguf() -> list:
    """Flux.2 dev as core's template (image_flux2_text_to_image) builds it, with the diffusion model and the
    Mistral-Small-3.2 24B text encoder from GGUF files (the text encoder's tekken tokenizer comes from the file)."""
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "flux2-dev-Q4_K_M.gguf", "weight_dtype": "default", **distorch(12.0)},
         (0, 0)),
        (2, "DisTorchCLIPLoader", {"clip_name": "Mistral-Small-3.2-24B-Instruct-2506-Q4_K_M.gguf", "type": "flux2",
                                   **distorch(8.0)}, (0, 330)),
        (3, "CLIPTextEncode", {"text": "a ceramic teapot shaped like a snail on a sunlit windowsill, steam rising, "
                                       "product photograph, soft shadows", "clip": Link(2)}, (420, 330)),
        (4, "FluxGuidance", {"conditioning": Link(3), "guidance": 4.0}, (420, 540)),
        (5, "BasicGuider", {"model": Link(1), "conditioning": Link(4)}, (840, 0)),
        (6, "RandomNoise", {"noise_seed": 42}, (840, 160)),
        (7, "KSamplerSelect", {"sampler_name": "euler"}, (840, 300)),
        (8, "Flux2Scheduler", {"steps": 20, "width": 1024, "height": 1024}, (840, 440)),
        (9, "EmptyFlux2LatentImage", {"width": 1024, "height": 1024, "batch_size": 1}, (840, 640)),
        (10, "SamplerCustomAdvanced", {"noise": Link(6), "guider": Link(5), "sampler": Link(7), "sigmas": Link(8),
                                       "latent_image": Link(9)}, (1260, 0)),
        (11, "DisTorchVAELoader", {"vae_name": "flux2-vae.safetensors", **distorch(0.0)}, (1260, 240)),
        (12, "VAEDecode", {"samples": Link(10), "vae": Link(11)}, (1680, 0)),
        (13, "SaveImage", {"images": Link(12), "filename_prefix": "DisTorch_flux2"}, (1680, 160)),
    ]


def qwen_image_edit_gguf() -> list:
    """Qwen-Image-Edit as core's template (image_qwen_image_edit) builds it: the Qwen2.5-VL 7B text encoder GGUF and
    its vision tower (the mmproj GGUF, second file of the dual loader) see the input image; the diffusion model is a
    GGUF too. Put an image named example.png in ComfyUI's input folder (ComfyUI ships one) or pick your own."""
    return [
        (1, "DisTorchUNetLoader", {"unet_name": "Qwen_Image_Edit-Q4_K_M.gguf", "weight_dtype": "default",
                                   **distorch(8.0)}, (0, 0)),
        (2, "DisTorchDualCLIPLoader", {"clip_name1": "Qwen2.5-VL-7B-Instruct-Q8_0.gguf",
                                       "clip_name2": "Qwen2.5-VL-7B-Instruct-mmproj-F16.gguf", "type": "qwen_image",
                                       **distorch(4.0)}, (0, 330)),
        (3, "DisTorchVAELoader", {"vae_name": "qwen_image_vae.safetensors", **distorch(0.0)}, (0, 660)),
        (4, "LoadImage", {"image": "example.png"}, (0, 900)),
        (5, "FluxKontextImageScale", {"image": Link(4)}, (420, 900)),
        (6, "TextEncodeQwenImageEdit", {"clip": Link(2), "prompt": "make it a snowy winter evening, warm light in "
                                        "the windows", "vae": Link(3), "image": Link(5)}, (420, 330)),
        (7, "TextEncodeQwenImageEdit", {"clip": Link(2), "prompt": "", "vae": Link(3), "image": Link(5)},
         (420, 560)),
        (8, "ModelSamplingAuraFlow", {"model": Link(1), "shift": 3.0}, (420, 0)),
        (9, "CFGNorm", {"model": Link(8), "strength": 1.0}, (420, 160)),
        (10, "VAEEncode", {"pixels": Link(5), "vae": Link(3)}, (840, 560)),
        (11, "KSampler", sampler(Link(9), Link(6), Link(7), Link(10), steps=20, cfg=2.5), (840, 0)),
        (12, "VAEDecode", {"samples": Link(11), "vae": Link(3)}, (1260, 0)),
        (13, "SaveImage", {"images": Link(12), "filename_prefix": "DisTorch_qwen_image_edit"}, (1260, 160)),
    ]


WORKFLOWS = {"flux1_dev_gguf": flux_gguf, "wan22_14b_t2v": wan22_t2v, "wan22_14b_t2v_gguf": wan22_t2v_gguf,
             "hunyuan_video_t2v": hunyuan_video, "sd35_large": sd35_large, "ltx2_t2v_gguf": ltx2_t2v_gguf,
             "flux2_dev_gguf": flux2_dev_gguf, "qwen_image_edit_gguf": qwen_image_edit_gguf}
# The oldest ComfyUI each workflow's core nodes exist in (as recorded in tests/data/core_nodes.json, whose "since"
# is the oldest recorded version that has a node); the others run on OLDEST_COMFYUI.
MIN_COMFYUI = {"ltx2_t2v_gguf": "0.8.0", "flux2_dev_gguf": "0.8.0"}


def main() -> None:
    out = ROOT / "workflows"
    out.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        graph = build()
        (out / f"{name}.json").write_text(json.dumps(ui_format(graph, MIN_COMFYUI.get(name, OLDEST_COMFYUI)),
                                                     indent=1) + "\n")
        (out / f"{name}_api.json").write_text(json.dumps(api_format(graph), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/{name}_api.json")


if __name__ == "__main__":
    main()
