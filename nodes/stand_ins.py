"""Stand-ins for the loader node ids of ComfyUI-MultiGPU and ComfyUI-GGUF, so workflows built on them run here.

A pack's ids are registered only when ComfyUI does not load that pack (installed_packs.py), and never an
id something else has already registered: an installed pack is never shadowed. Each stand-in has the
original's inputs (names, order, required/optional, defaults) and runs the DisTorch loader its values
map onto; the table and the mapping are distorch/legacy_loaders.py, which the workflow converter uses too.
"""

import logging

import folder_paths
from comfy_api.latest import io

import nodes as core_nodes

from ..distorch.catalog import NODE_TITLES
from ..distorch.legacy_loaders import GGUF, GGUF_DTYPES, MULTIGPU, LegacyLoader, loaders_of
from .checkpoint import load_checkpoint
from .devices import compute_devices, machine
from .folders import UNET_GGUF_KEY, text_encoder_files, unet_files, vae_files
from .inputs import CHECKPOINT_LOADER, LoaderNode, core_choices
from .installed_packs import installed_packs
from .loading import UNET_WEIGHT_DTYPES, load_clip, load_unet, load_vae
from .progress import executing_node_id
from .settings import TOOLTIPS, VIRTUAL_VRAM_STEP_GB

logger = logging.getLogger("distorch.nodes")

CATEGORY = "DisTorch/compat"


def stand_in_nodes() -> list[type[io.ComfyNode]]:
    """The stand-in nodes for the packs ComfyUI does not load; logs what it registered and what it left alone."""
    installed = installed_packs(folder_paths.get_folder_paths("custom_nodes"), _whitelist())
    built = []
    for pack in (MULTIGPU, GGUF):
        if pack in installed:
            logger.info("distorch: %s is installed (%s); its loader ids are left to it", pack, installed[pack])
            continue
        entries = loaders_of(pack)
        taken = [e.node_id for e in entries if e.node_id in core_nodes.NODE_CLASS_MAPPINGS]
        built += [stand_in(e) for e in entries if e.node_id not in taken]
        logger.info("distorch: %s is not installed: %d of its loader ids run on DisTorch (category %s)%s", pack,
                    len(entries) - len(taken), CATEGORY,
                    f"; already registered by another pack: {', '.join(taken)}" if taken else "")
    return built


def _whitelist() -> list[str] | None:
    from comfy.cli_args import args

    return list(args.whitelist_custom_nodes) if getattr(args, "disable_all_custom_nodes", False) else None


def stand_in(entry: LegacyLoader) -> type[io.ComfyNode]:
    """A V3 node with `entry`'s inputs that runs the DisTorch loader they map onto."""

    class StandIn(LoaderNode):
        TARGET = entry.target

        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=entry.node_id, display_name=f"{entry.title} (DisTorch)", category=CATEGORY,
                description=(f"Stands in for {entry.pack}'s {entry.node_id}, which is not installed: same inputs, "
                             f"loaded by {NODE_TITLES[entry.target]}. 'Convert loaders to DisTorch' in the canvas "
                             "menu switches the workflow to the DisTorch node."),
                inputs=[_widget(i) for i in entry.inputs], outputs=[_OUTPUTS[t]() for t in entry.outputs])

        @classmethod
        def native_values(cls, values: dict) -> dict:
            return entry.to_native(values, machine())

        @classmethod
        def execute(cls, **values) -> io.NodeOutput:
            native = cls.native_values(values)
            outputs, plan_ui = _load(entry.target, native, cls.settings(values), executing_node_id())
            return io.NodeOutput(*outputs, ui=plan_ui)

    StandIn.__name__ = StandIn.__qualname__ = entry.node_id
    return StandIn


def _load(target: str, native: dict, settings, node_id: str | None) -> tuple[tuple, dict]:
    if target == "DisTorchUNetLoader":
        model, plan_ui = load_unet(native["unet_name"], native["weight_dtype"], settings, node_id)
        return (model,), plan_ui
    if target == "DisTorchVAELoader":
        vae, plan_ui = load_vae(native["vae_name"], settings, node_id)
        return (vae,), plan_ui
    if target == CHECKPOINT_LOADER:
        return load_checkpoint(native["ckpt_name"], settings, node_id)
    files = [native[k] for k in sorted(native) if k.startswith("clip_name")]
    clip, plan_ui = load_clip(files, native.get("type") or "stable_diffusion", settings, node_id)
    return (clip,), plan_ui


_OUTPUTS = {"MODEL": io.Model.Output, "CLIP": io.Clip.Output, "VAE": io.Vae.Output}


def _widget(spec):
    tooltip = spec.note or TOOLTIPS.get(_setting_name(spec.name), "") or _FILE_TOOLTIPS.get(spec.kind, "")
    common = {"optional": spec.optional, "tooltip": tooltip or None}
    if spec.kind == "device":
        devices = list(compute_devices())
        default = devices[0] if spec.default is None else spec.default
        return io.Combo.Input(spec.name, options=devices, default=default, **common)
    if spec.kind == "gb":
        return io.Float.Input(spec.name, default=spec.default, min=0.0, max=spec.maximum, step=VIRTUAL_VRAM_STEP_GB,
                              **common)
    if spec.kind == "flag":
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.kind == "text":
        return io.String.Input(spec.name, default=spec.default, **common)
    options = _choices(spec.kind)
    default = spec.default if spec.default in options else None
    return io.Combo.Input(spec.name, options=options, default=default, **common)


def _choices(kind: str) -> list[str]:
    if kind == "weight_dtype":
        return list(UNET_WEIGHT_DTYPES)
    if kind == "gguf_dtype":
        return list(GGUF_DTYPES)
    if kind == "clip_type":
        return core_choices("CLIPLoader", "type", ["stable_diffusion"])
    if kind == "dual_clip_type":
        return core_choices("DualCLIPLoader", "type", ["sdxl"])
    return {"unet_file": unet_files, "clip_file": text_encoder_files, "vae_file": vae_files,
            "unet_gguf_file": lambda: folder_paths.get_filename_list(UNET_GGUF_KEY),
            "ckpt_file": lambda: folder_paths.get_filename_list("checkpoints")}[kind]()


def _setting_name(name: str) -> str:
    """The DisTorch input an original input feeds (its tooltip): `device` → compute_device, `unet_…` → …"""
    bare = name.removeprefix("unet_").removeprefix("clip_")
    return {"device": "compute_device", "vae_device": "compute_device"}.get(bare, bare)


_FILE_TOOLTIPS = {
    "unet_file": "Diffusion model from models/diffusion_models or models/unet (.gguf too).",
    "unet_gguf_file": "GGUF diffusion model from models/diffusion_models or models/unet.",
    "clip_file": "Text encoder from models/text_encoders or models/clip (.gguf too).",
    "vae_file": "VAE from models/vae.",
    "ckpt_file": "Checkpoint from models/checkpoints.",
    "weight_dtype": "As in Load Diffusion Model: store safetensors weights as fp8.",
    "clip_type": "Model family, as in the core loader.",
    "dual_clip_type": "Model family, as in the core loader.",
}
