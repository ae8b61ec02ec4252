"""The DisTorch loader nodes (ComfyUI V3 API) and their registration.

Each node is declarative: a schema, the `validate_inputs` every loader shares (inputs.py: it rejects bad
DisTorch inputs before the queue runs), and an `execute` that calls one loading function and returns the standard
MODEL / CLIP / VAE plus the plan for the node's block map and table (nodes/web/js/distorch.js):
`ui` carries `text` (the table) and `distorch_plan` (distorch.report.plan_to_dict).
"""

import folder_paths
from comfy_api.latest import ComfyExtension, io

from .catalog import FILE_INPUTS, NODE_TITLES
from .checkpoint import load_checkpoint
from .convert_route import register_convert_route
from .devices import compute_devices
from .folders import register_gguf_folders, text_encoder_files, unet_files, vae_files
from .inputs import CHECKPOINT_LOADER, LoaderNode, core_choices, distorch_inputs, stream_format_input
from .loading import UNET_WEIGHT_DTYPES, load_clip, load_unet, load_vae
from .progress import executing_node_id
from .stand_ins import stand_in_nodes

WEB_DIRECTORY = "./nodes/web"
CATEGORY = "DisTorch"


class DisTorchUNetLoader(LoaderNode):
    TARGET = "DisTorchUNetLoader"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DisTorchUNetLoader",
            display_name=NODE_TITLES["DisTorchUNetLoader"],
            category=CATEGORY,
            description=("Loads a diffusion model (.safetensors or .gguf). With auto_placement each run keeps as "
                         "much of it on the compute GPU as ComfyUI's budget for that run allows; otherwise "
                         "virtual_vram_gb of it lives in pinned RAM or a donor GPU. Those blocks are streamed to the "
                         "compute GPU just before they run."),
            inputs=[
                io.Combo.Input("unet_name", options=unet_files(),
                               tooltip="Diffusion model from models/diffusion_models or models/unet (.gguf too)."),
                io.Combo.Input("weight_dtype", options=list(UNET_WEIGHT_DTYPES), default="default",
                               tooltip="As in Load Diffusion Model: store safetensors weights as fp8 to halve them. "
                                       "Ignored for .gguf files, which keep their own quantization."),
                *distorch_inputs("unet"),
                stream_format_input(),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, weight_dtype, compute_device, virtual_vram_gb, donor_device,
                expert_mode_allocations="", auto_placement=False, stream_format="stored") -> io.NodeOutput:
        settings = cls.settings(dict(compute_device=compute_device, virtual_vram_gb=virtual_vram_gb,
                                     donor_device=donor_device, expert_mode_allocations=expert_mode_allocations,
                                     auto_placement=auto_placement, stream_format=stream_format))
        model, plan_ui = load_unet(unet_name, weight_dtype, settings, executing_node_id())
        return io.NodeOutput(model, ui=plan_ui)


def _clip_node(node_id: str, type_node: str | None, description: str, more_types_from: str | None = None):
    """Builds a text-encoder loader with the file inputs of the catalog (and core's `type` choices when it has them;
    `more_types_from` appends another core loader's choices it lacks)."""

    class Loader(LoaderNode):
        TARGET = node_id

        @classmethod
        def define_schema(cls):
            names = [n for n in FILE_INPUTS[node_id] if n.startswith("clip_name")]
            inputs = [io.Combo.Input(n, options=text_encoder_files(),
                                     tooltip="Text encoder from models/text_encoders or models/clip (.gguf too).")
                      for n in names]
            if type_node is not None:
                types = core_choices(type_node, "type", ["stable_diffusion"])
                if more_types_from is not None:
                    types += [t for t in core_choices(more_types_from, "type", []) if t not in types]
                inputs.append(io.Combo.Input("type", options=types, default=types[0],
                                             tooltip="Model family, as in the core loader."))
            return io.Schema(node_id=node_id, display_name=NODE_TITLES[node_id], category=CATEGORY,
                             description=description,
                             inputs=[*inputs, *distorch_inputs("clip"), stream_format_input()],
                             outputs=[io.Clip.Output()])

        @classmethod
        def execute(cls, compute_device, virtual_vram_gb, donor_device, expert_mode_allocations="", type=None,
                    auto_placement=False, stream_format="stored", **files) -> io.NodeOutput:
            settings = cls.settings(dict(compute_device=compute_device, virtual_vram_gb=virtual_vram_gb,
                                         donor_device=donor_device, expert_mode_allocations=expert_mode_allocations,
                                         auto_placement=auto_placement, stream_format=stream_format))
            ordered = [files[k] for k in sorted(files)]
            clip, plan_ui = load_clip(ordered, type or "stable_diffusion", settings, executing_node_id())
            return io.NodeOutput(clip, ui=plan_ui)

    Loader.__name__ = Loader.__qualname__ = node_id
    return Loader


DisTorchCLIPLoader = _clip_node(
    "DisTorchCLIPLoader", "CLIPLoader",
    "Loads a text encoder (.safetensors or .gguf, llama.cpp names mapped) with DisTorch placement.")
DisTorchDualCLIPLoader = _clip_node(
    "DisTorchDualCLIPLoader", "DualCLIPLoader",
    "Loads two text encoders (e.g. clip_l + t5xxl for FLUX) as one CLIP with DisTorch placement; also a GGUF text "
    "encoder with its vision tower (Qwen2.5-VL + mmproj .gguf: type qwen_image, for Qwen-Image-Edit).",
    # A text encoder and its mmproj form one encoder of a single-encoder family, so those types are offered too.
    more_types_from="CLIPLoader")
DisTorchTripleCLIPLoader = _clip_node(
    "DisTorchTripleCLIPLoader", None,
    "Loads three text encoders (e.g. clip_l, clip_g, t5xxl for SD3.5) with DisTorch placement.")
DisTorchQuadrupleCLIPLoader = _clip_node(
    "DisTorchQuadrupleCLIPLoader", None,
    "Loads four text encoders (HiDream: clip_l, clip_g, t5xxl, llama) with DisTorch placement.")


class DisTorchVAELoader(LoaderNode):
    TARGET = "DisTorchVAELoader"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DisTorchVAELoader",
            display_name=NODE_TITLES["DisTorchVAELoader"],
            category=CATEGORY,
            description="Loads a VAE on the chosen device; large video VAEs can stream part of their blocks.",
            inputs=[io.Combo.Input("vae_name", options=vae_files(), tooltip="VAE from models/vae."),
                    *distorch_inputs("vae"), stream_format_input()],
            outputs=[io.Vae.Output()],
        )

    @classmethod
    def execute(cls, vae_name, compute_device, virtual_vram_gb, donor_device, expert_mode_allocations="",
                auto_placement=False, stream_format="stored"):
        settings = cls.settings(dict(compute_device=compute_device, virtual_vram_gb=virtual_vram_gb,
                                     donor_device=donor_device, expert_mode_allocations=expert_mode_allocations,
                                     auto_placement=auto_placement, stream_format=stream_format))
        vae, plan_ui = load_vae(vae_name, settings, executing_node_id())
        return io.NodeOutput(vae, ui=plan_ui)


class DisTorchCheckpointLoader(LoaderNode):
    TARGET = CHECKPOINT_LOADER

    @classmethod
    def define_schema(cls):
        devices = compute_devices()
        unet, clip = distorch_inputs("unet", "unet_"), distorch_inputs("clip", "clip_")
        return io.Schema(
            node_id="DisTorchCheckpointLoader",
            display_name=NODE_TITLES["DisTorchCheckpointLoader"],
            category=CATEGORY,
            description=("Loads an all-in-one checkpoint as Load Checkpoint does; the diffusion model and the text "
                         "encoders each get their own virtual VRAM, the VAE its own device."),
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="Checkpoint from models/checkpoints."),
                *unet[:3], *clip[:3],
                io.Combo.Input("vae_device", options=list(devices), default=devices[0],
                               tooltip="Device the VAE decodes and encodes on."),
                unet[3], clip[3], unet[4], clip[4],
                stream_format_input(),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, ckpt_name, **values) -> io.NodeOutput:
        settings = cls.settings(values)
        outputs, plan_ui = load_checkpoint(ckpt_name, settings, executing_node_id())
        return io.NodeOutput(*outputs, ui=plan_ui)


NODES = [DisTorchUNetLoader, DisTorchCLIPLoader, DisTorchDualCLIPLoader, DisTorchTripleCLIPLoader,
         DisTorchQuadrupleCLIPLoader, DisTorchVAELoader, DisTorchCheckpointLoader]


class DisTorchExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from server import PromptServer  # ComfyUI's server module: importable once ComfyUI runs

        register_gguf_folders()
        register_convert_route(PromptServer.instance.routes)
        return NODES + stand_in_nodes()


async def comfy_entrypoint() -> DisTorchExtension:
    return DisTorchExtension()
