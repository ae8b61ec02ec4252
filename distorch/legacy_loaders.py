"""The loader node ids of ComfyUI-MultiGPU (v2.6), ComfyUI-GGUF and core, and how each maps onto a DisTorch node.

One table serves the stand-in nodes ComfyUI registers when those packs are not installed (nodes/stand_ins.py)
and the workflow converter (convert.py). An entry lists the original's widget inputs as the original
declares them (names, order, required/optional, defaults) and a rule that turns their values into the
values of the DisTorch node doing the work. Pure data: no ComfyUI import. Every mapping places by the original's
numbers: `auto_placement` is off (fixed mode) on every node an old workflow turns into, as it was made.

What the inputs without a counterpart here do (documented on the nodes and in the README):
- `eject_models`: no effect. ComfyUI's model management decides what to unload (in MultiGPU 2.6 the
  toggle had no effect either).
- `high_precision_loras`: no effect. LoRAs run on the compute device (core's patches; a low-rank side path
  on streamed and GGUF layers).
- `use_other_vram` (DisTorch v1): the donor becomes the first other GPU (MultiGPU used every other GPU,
  then RAM); what does not fit there spills into RAM.
- `dequant_dtype`, `patch_dtype`, `patch_on_device` (ComfyUI-GGUF): no effect. GGUF weights are
  dequantized to the layer's compute dtype and LoRAs are applied on the compute device.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .catalog import LATER_INPUTS, widget_inputs

MULTIGPU = "ComfyUI-MultiGPU"
GGUF = "ComfyUI-GGUF"
CORE = "core"

GGUF_DTYPES = ("default", "target", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Input:
    """One widget input of an original node.

    `kind` says what the widget holds: a file list ("unet_file", "unet_gguf_file", "clip_file", "ckpt_file",
    "vae_file"), a fixed choice ("weight_dtype", "gguf_dtype", "clip_type", "dual_clip_type", and
    "core_clip_device": core's default/cpu), "device", "gb" (a virtual VRAM slider), "flag" or "text". A
    `default` of None means the machine's default device (devices) or the first file (files).
    """

    name: str
    kind: str
    default: object = None
    optional: bool = False
    maximum: float = 128.0
    note: str = ""
    ignored: bool = False  # accepted for old workflows, no effect here (the note says why)


@dataclass(frozen=True)
class Machine:
    """What a mapping needs to know about the machine: the default compute device and the GPUs."""

    default_device: str = "cuda:0"
    gpus: tuple[str, ...] = ("cuda:0",)

    def other_gpu(self, compute: str) -> str:
        """The first GPU that is not `compute` ('cpu' when there is none): DisTorch v1's `use_other_vram` donor."""
        return next((g for g in self.gpus if g != compute), "cpu")


Rule = Callable[[Mapping, Machine], dict]


@dataclass(frozen=True)
class LegacyLoader:
    """An original loader node and the DisTorch node its values map onto."""

    node_id: str
    pack: str
    title: str
    target: str
    inputs: tuple[Input, ...]
    rule: Rule = field(compare=False)
    outputs: tuple[str, ...] = ("MODEL",)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    def defaults(self, machine: Machine) -> dict:
        return {i.name: machine.default_device if i.kind == "device" and i.default is None else i.default
                for i in self.inputs}

    def to_native(self, values: Mapping, machine: Machine) -> dict:
        """The target node's values, in its widget order, from the original's values (missing ones: defaults)."""
        filled = {**self.defaults(machine), **{k: v for k, v in values.items() if k in self.input_names}}
        native = {**LATER_INPUTS, **self.rule(filled, machine)}  # inputs the originals never had: their defaults
        order = widget_inputs(self.target)
        missing = [n for n in order if n not in native]
        if missing:
            raise AssertionError(f"{self.node_id}: the mapping leaves {missing} unset")
        return {name: native[name] for name in order}

    def carried(self) -> dict[str, str]:
        """Original input name → target input name for the values that pass through unchanged (or renamed)."""
        renamed = {k: v for k, v in _CARRIED.get(self.rule, {}).items() if k in self.input_names}
        return renamed | {n: n for n in self.input_names if n in widget_inputs(self.target)}


# -- the inputs ------------------------------------------------------------------------------------------------

EJECT_NOTE = "Accepted for old workflows; no effect here (ComfyUI's model management decides what to unload)."
LORA_NOTE = "Accepted for old workflows; no effect here (LoRAs run on the compute device, in its dtype)."
GGUF_DTYPE_NOTE = "Accepted for old workflows; no effect here (GGUF weights dequantize to the layer's compute dtype)."
OTHER_VRAM_NOTE = "DisTorch v1: use another GPU's VRAM as the donor (the first other GPU here), then RAM."


def _files(kind: str, *names: str) -> tuple[Input, ...]:
    return tuple(Input(n, kind) for n in names)


def _distorch2(device_name: str, eject_default: bool) -> tuple[Input, ...]:
    """The optional inputs MultiGPU's DisTorch2 wrappers add (`device` is the CLIP loaders' name for it)."""
    return (Input(device_name, "device", optional=True), Input("virtual_vram_gb", "gb", 4.0, optional=True),
            Input("donor_device", "device", "cpu", optional=True),
            Input("expert_mode_allocations", "text", "", optional=True),
            Input("eject_models", "flag", eject_default, optional=True, note=EJECT_NOTE, ignored=True))


def _distorch1() -> tuple[Input, ...]:
    """The optional inputs of MultiGPU's legacy DisTorch (v1) GGUF wrappers."""
    return (Input("device", "device", optional=True), Input("virtual_vram_gb", "gb", 4.0, optional=True, maximum=24.0),
            Input("use_other_vram", "flag", False, optional=True, note=OTHER_VRAM_NOTE),
            Input("expert_mode_allocations", "text", "", optional=True))


DEVICE = (Input("device", "device", optional=True),)
UNET = _files("unet_file", "unet_name") + (Input("weight_dtype", "weight_dtype", "default"),)
UNET_GGUF = _files("unet_gguf_file", "unet_name")
UNET_GGUF_ADVANCED = UNET_GGUF + (
    Input("dequant_dtype", "gguf_dtype", "default", note=GGUF_DTYPE_NOTE, ignored=True),
    Input("patch_dtype", "gguf_dtype", "default", note=GGUF_DTYPE_NOTE, ignored=True),
    Input("patch_on_device", "flag", False, note=LORA_NOTE, ignored=True))
CLIP = _files("clip_file", "clip_name") + (Input("type", "clip_type", "stable_diffusion"),)
DUAL_CLIP = _files("clip_file", "clip_name1", "clip_name2") + (Input("type", "dual_clip_type", "sdxl"),)
TRIPLE_CLIP = _files("clip_file", "clip_name1", "clip_name2", "clip_name3")
QUADRUPLE_CLIP = _files("clip_file", "clip_name1", "clip_name2", "clip_name3", "clip_name4")
VAE = _files("vae_file", "vae_name")
CKPT = _files("ckpt_file", "ckpt_name")
CORE_CLIP_DEVICE = (Input("device", "core_clip_device", "default", optional=True),)

CHECKPOINT_ADVANCED_DISTORCH2 = CKPT + (
    Input("unet_compute_device", "device"), Input("unet_virtual_vram_gb", "gb", 4.0),
    Input("unet_donor_device", "device", "cpu"), Input("clip_compute_device", "device", "cpu"),
    Input("clip_virtual_vram_gb", "gb", 2.0), Input("clip_donor_device", "device", "cpu"),
    Input("vae_device", "device"),
    Input("unet_expert_mode_allocations", "text", "", optional=True),
    Input("clip_expert_mode_allocations", "text", "", optional=True),
    Input("high_precision_loras", "flag", True, optional=True, note=LORA_NOTE, ignored=True),
    Input("eject_models", "flag", True, optional=True, note=EJECT_NOTE, ignored=True))
CHECKPOINT_ADVANCED = CKPT + (Input("unet_device", "device"), Input("clip_device", "device"),
                              Input("vae_device", "device"))


# -- the rules --------------------------------------------------------------------------------------------------

def _keep(values: Mapping, *names: str) -> dict:
    return {n: values[n] for n in names if n in values}


def _file_values(values: Mapping) -> dict:
    return _keep(values, "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4", "vae_name",
                 "ckpt_name", "type")


def _placed(compute: str) -> dict:
    """The whole model on one device: what the plain MultiGPU wrappers and core's loaders do."""
    return {"compute_device": compute, "virtual_vram_gb": 0.0, "donor_device": "cpu", "expert_mode_allocations": "",
            "auto_placement": False}


def _unet_dtype(values: Mapping) -> dict:
    return {"weight_dtype": values.get("weight_dtype", "default")}


def distorch2_rule(values: Mapping, machine: Machine) -> dict:
    """DisTorch2 wrappers: the same four inputs (`device` is `compute_device` on the CLIP loaders)."""
    compute = values["compute_device"] if "compute_device" in values else values["device"]
    return {**_file_values(values), **_unet_dtype(values), "compute_device": compute,
            "virtual_vram_gb": values["virtual_vram_gb"], "donor_device": values["donor_device"],
            "expert_mode_allocations": values["expert_mode_allocations"] or "", "auto_placement": False}


def distorch1_rule(values: Mapping, machine: Machine) -> dict:
    """Legacy DisTorch (v1): `use_other_vram` picks another GPU as the donor instead of RAM."""
    compute = values["device"]
    donor = machine.other_gpu(compute) if values["use_other_vram"] and compute != "cpu" else "cpu"
    return {**_file_values(values), **_unet_dtype(values), "compute_device": compute,
            "virtual_vram_gb": values["virtual_vram_gb"], "donor_device": donor,
            "expert_mode_allocations": values["expert_mode_allocations"] or "", "auto_placement": False}


def device_rule(values: Mapping, machine: Machine) -> dict:
    """Plain MultiGPU wrappers: the whole model on the chosen device."""
    return {**_file_values(values), **_unet_dtype(values), **_placed(values["device"])}


def default_device_rule(values: Mapping, machine: Machine) -> dict:
    """ComfyUI-GGUF and core loaders: the whole model on the default device (core's CLIP `device` may say cpu)."""
    compute = "cpu" if values.get("device") == "cpu" else machine.default_device
    return {**_file_values(values), **_unet_dtype(values), **_placed(compute)}


def _checkpoint(ckpt: str, unet: Mapping, clip: Mapping, vae_device: str) -> dict:
    return {"ckpt_name": ckpt, "unet_compute_device": unet["compute_device"],
            "unet_virtual_vram_gb": unet["virtual_vram_gb"], "unet_donor_device": unet["donor_device"],
            "clip_compute_device": clip["compute_device"], "clip_virtual_vram_gb": clip["virtual_vram_gb"],
            "clip_donor_device": clip["donor_device"], "vae_device": vae_device,
            "unet_expert_mode_allocations": unet["expert_mode_allocations"],
            "clip_expert_mode_allocations": clip["expert_mode_allocations"],
            "unet_auto_placement": unet["auto_placement"], "clip_auto_placement": clip["auto_placement"]}


def checkpoint_distorch2_rule(values: Mapping, machine: Machine) -> dict:
    """MultiGPU's simple DisTorch2 checkpoint loader distributes the diffusion model; CLIP and VAE sit on the device."""
    unet = distorch2_rule(values, machine)
    return _checkpoint(values["ckpt_name"], unet, _placed(unet["compute_device"]), unet["compute_device"])


def checkpoint_advanced_distorch2_rule(values: Mapping, machine: Machine) -> dict:
    unet, clip = ({"compute_device": values[f"{p}_compute_device"], "virtual_vram_gb": values[f"{p}_virtual_vram_gb"],
                   "donor_device": values[f"{p}_donor_device"],
                   "expert_mode_allocations": values[f"{p}_expert_mode_allocations"] or "", "auto_placement": False}
                  for p in ("unet", "clip"))
    return _checkpoint(values["ckpt_name"], unet, clip, values["vae_device"])


def checkpoint_device_rule(values: Mapping, machine: Machine) -> dict:
    device = values["device"]
    return _checkpoint(values["ckpt_name"], _placed(device), _placed(device), device)


def checkpoint_advanced_rule(values: Mapping, machine: Machine) -> dict:
    return _checkpoint(values["ckpt_name"], _placed(values["unet_device"]), _placed(values["clip_device"]),
                       values["vae_device"])


def checkpoint_default_rule(values: Mapping, machine: Machine) -> dict:
    device = machine.default_device
    return _checkpoint(values["ckpt_name"], _placed(device), _placed(device), device)


# Inputs whose value passes to the target under another name (the converter keeps links on them).
_CARRIED = {
    distorch2_rule: {"device": "compute_device"},
    distorch1_rule: {"device": "compute_device"},
    device_rule: {"device": "compute_device"},
}


# -- the table ----------------------------------------------------------------------------------------------------

def _entry(node_id, pack, title, target, inputs, rule, outputs=None) -> LegacyLoader:
    if outputs is None:
        outputs = {"DisTorchUNetLoader": ("MODEL",), "DisTorchVAELoader": ("VAE",),
                   "DisTorchCheckpointLoader": ("MODEL", "CLIP", "VAE")}.get(target, ("CLIP",))
    return LegacyLoader(node_id, pack, title, target, tuple(inputs), rule, outputs)


def _multigpu_entries() -> list[LegacyLoader]:
    d2, d2_clip = _distorch2("compute_device", True), _distorch2("device", False)
    entries = [
        ("UNETLoaderDisTorch2MultiGPU", "DisTorchUNetLoader", UNET + d2, distorch2_rule),
        ("VAELoaderDisTorch2MultiGPU", "DisTorchVAELoader", VAE + d2, distorch2_rule),
        ("CLIPLoaderDisTorch2MultiGPU", "DisTorchCLIPLoader", CLIP + d2_clip, distorch2_rule),
        ("DualCLIPLoaderDisTorch2MultiGPU", "DisTorchDualCLIPLoader", DUAL_CLIP + d2_clip, distorch2_rule),
        ("TripleCLIPLoaderDisTorch2MultiGPU", "DisTorchTripleCLIPLoader", TRIPLE_CLIP + d2_clip, distorch2_rule),
        ("QuadrupleCLIPLoaderDisTorch2MultiGPU", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP + d2_clip,
         distorch2_rule),
        ("CheckpointLoaderSimpleDisTorch2MultiGPU", "DisTorchCheckpointLoader", CKPT + d2, checkpoint_distorch2_rule),
        ("CheckpointLoaderAdvancedDisTorch2MultiGPU", "DisTorchCheckpointLoader", CHECKPOINT_ADVANCED_DISTORCH2,
         checkpoint_advanced_distorch2_rule),
        ("UnetLoaderGGUFDisTorch2MultiGPU", "DisTorchUNetLoader", UNET_GGUF + d2, distorch2_rule),
        ("UnetLoaderGGUFAdvancedDisTorch2MultiGPU", "DisTorchUNetLoader", UNET_GGUF_ADVANCED + d2, distorch2_rule),
        ("CLIPLoaderGGUFDisTorch2MultiGPU", "DisTorchCLIPLoader", CLIP + d2_clip, distorch2_rule),
        ("DualCLIPLoaderGGUFDisTorch2MultiGPU", "DisTorchDualCLIPLoader", DUAL_CLIP + d2_clip, distorch2_rule),
        ("TripleCLIPLoaderGGUFDisTorch2MultiGPU", "DisTorchTripleCLIPLoader", TRIPLE_CLIP + d2_clip, distorch2_rule),
        ("QuadrupleCLIPLoaderGGUFDisTorch2MultiGPU", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP + d2_clip,
         distorch2_rule),
        # Legacy DisTorch (v1) GGUF loaders.
        ("UnetLoaderGGUFDisTorchMultiGPU", "DisTorchUNetLoader", UNET_GGUF + _distorch1(), distorch1_rule),
        ("UnetLoaderGGUFAdvancedDisTorchMultiGPU", "DisTorchUNetLoader", UNET_GGUF_ADVANCED + _distorch1(),
         distorch1_rule),
        ("CLIPLoaderGGUFDisTorchMultiGPU", "DisTorchCLIPLoader", CLIP + _distorch1(), distorch1_rule),
        ("DualCLIPLoaderGGUFDisTorchMultiGPU", "DisTorchDualCLIPLoader", DUAL_CLIP + _distorch1(), distorch1_rule),
        ("TripleCLIPLoaderGGUFDisTorchMultiGPU", "DisTorchTripleCLIPLoader", TRIPLE_CLIP + _distorch1(),
         distorch1_rule),
        ("QuadrupleCLIPLoaderGGUFDisTorchMultiGPU", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP + _distorch1(),
         distorch1_rule),
        # Plain device wrappers: the whole model on one device.
        ("UNETLoaderMultiGPU", "DisTorchUNetLoader", UNET + DEVICE, device_rule),
        ("VAELoaderMultiGPU", "DisTorchVAELoader", VAE + DEVICE, device_rule),
        ("CLIPLoaderMultiGPU", "DisTorchCLIPLoader", CLIP + DEVICE, device_rule),
        ("DualCLIPLoaderMultiGPU", "DisTorchDualCLIPLoader", DUAL_CLIP + DEVICE, device_rule),
        ("TripleCLIPLoaderMultiGPU", "DisTorchTripleCLIPLoader", TRIPLE_CLIP + DEVICE, device_rule),
        ("QuadrupleCLIPLoaderMultiGPU", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP + DEVICE, device_rule),
        ("CheckpointLoaderSimpleMultiGPU", "DisTorchCheckpointLoader", CKPT + DEVICE, checkpoint_device_rule),
        ("CheckpointLoaderAdvancedMultiGPU", "DisTorchCheckpointLoader", CHECKPOINT_ADVANCED,
         checkpoint_advanced_rule),
        ("UnetLoaderGGUFMultiGPU", "DisTorchUNetLoader", UNET_GGUF + DEVICE, device_rule),
        ("UnetLoaderGGUFAdvancedMultiGPU", "DisTorchUNetLoader", UNET_GGUF_ADVANCED + DEVICE, device_rule),
        ("CLIPLoaderGGUFMultiGPU", "DisTorchCLIPLoader", CLIP + DEVICE, device_rule),
        ("DualCLIPLoaderGGUFMultiGPU", "DisTorchDualCLIPLoader", DUAL_CLIP + DEVICE, device_rule),
        ("TripleCLIPLoaderGGUFMultiGPU", "DisTorchTripleCLIPLoader", TRIPLE_CLIP + DEVICE, device_rule),
        ("QuadrupleCLIPLoaderGGUFMultiGPU", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP + DEVICE, device_rule),
    ]
    return [_entry(node_id, MULTIGPU, node_id, target, inputs, rule) for node_id, target, inputs, rule in entries]


def _gguf_entries() -> list[LegacyLoader]:
    entries = [
        ("UnetLoaderGGUF", "Unet Loader (GGUF)", "DisTorchUNetLoader", UNET_GGUF),
        ("UnetLoaderGGUFAdvanced", "Unet Loader (GGUF/Advanced)", "DisTorchUNetLoader", UNET_GGUF_ADVANCED),
        ("CLIPLoaderGGUF", "CLIPLoader (GGUF)", "DisTorchCLIPLoader", CLIP),
        ("DualCLIPLoaderGGUF", "DualCLIPLoader (GGUF)", "DisTorchDualCLIPLoader", DUAL_CLIP),
        ("TripleCLIPLoaderGGUF", "TripleCLIPLoader (GGUF)", "DisTorchTripleCLIPLoader", TRIPLE_CLIP),
        ("QuadrupleCLIPLoaderGGUF", "QuadrupleCLIPLoader (GGUF)", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP),
    ]
    return [_entry(node_id, GGUF, title, target, inputs, default_device_rule)
            for node_id, title, target, inputs in entries]


def _core_entries() -> list[LegacyLoader]:
    entries = [
        ("UNETLoader", "DisTorchUNetLoader", UNET, default_device_rule),
        ("CLIPLoader", "DisTorchCLIPLoader", CLIP + CORE_CLIP_DEVICE, default_device_rule),
        ("DualCLIPLoader", "DisTorchDualCLIPLoader", DUAL_CLIP + CORE_CLIP_DEVICE, default_device_rule),
        ("TripleCLIPLoader", "DisTorchTripleCLIPLoader", TRIPLE_CLIP, default_device_rule),
        ("QuadrupleCLIPLoader", "DisTorchQuadrupleCLIPLoader", QUADRUPLE_CLIP, default_device_rule),
        ("VAELoader", "DisTorchVAELoader", VAE, default_device_rule),
        ("CheckpointLoaderSimple", "DisTorchCheckpointLoader", CKPT, checkpoint_default_rule),
    ]
    return [_entry(node_id, CORE, node_id, target, inputs, rule) for node_id, target, inputs, rule in entries]


LEGACY_LOADERS: dict[str, LegacyLoader] = {
    e.node_id: e for e in _multigpu_entries() + _gguf_entries() + _core_entries()}


def loaders_of(pack: str) -> list[LegacyLoader]:
    return [e for e in LEGACY_LOADERS.values() if e.pack == pack]
