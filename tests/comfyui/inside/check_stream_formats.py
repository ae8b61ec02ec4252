"""Stream formats inside ComfyUI (issue 20, phase 2): a DisTorch UNet whose streamed blocks travel as Q8_0 or fp8.

The reference is core's own loader on the same file with the format's values written into the weights the format
encodes (decode(encode(w)), the pack's codec): core computes resident what DisTorch computes streamed, so the two
agree to float32 rounding (1e-4, as the other model-level checks). LoRA: a plain LoRA runs beside the decoded
layer (the side path) and a LoHa key through core's own `LowVramPatch`, which merges into the decoded weight each
forward; both equal core's merge into the dequantized weights. A model that holds no stored bytes of its encoded
weights refuses to be saved, and tells core the RAM it really holds.
"""

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
import pytest
import torch
from distorch_pack.distorch.blocks import cluster_tensors, discover, live_bytes
from distorch_pack.distorch.request import StreamFormat
from distorch_pack.distorch.stream_format import BlockCodec
from distorch_pack.nodes.loading import load_unet
from distorch_pack.nodes.settings import DisTorchSettings
from distorch_pack.nodes.state import DisTorchState
from make_models import STACKED_LORAS
from pack_in_comfyui import wan_forward

FILE = "tiny_wan21.safetensors"
ALL = 1.0  # GB: every block of the tiny Wan streamed
LORA_A = next(iter(STACKED_LORAS))


def settings(fmt: str) -> DisTorchSettings:
    return DisTorchSettings("cpu", ALL, "cpu", stream_format=fmt)


def core_model():
    return comfy.sd.load_diffusion_model(folder_paths.get_full_path_or_raise("diffusion_models", FILE))


def with_format_values(patcher, fmt: str) -> list[str]:
    """Writes the format's values into every weight of the model's blocks that the format encodes (as the streamer
    encodes them: the same codec, the same rules); returns their names."""
    changed = []
    for block in discover(patcher.model).blocks:
        codec = BlockCodec.build(block.clusters, StreamFormat.parse(fmt))
        sources = [live_bytes(c, cluster_tensors(patcher.model, c)) for c in block.clusters]
        encoded = torch.empty(codec.encoded_nbytes, dtype=torch.uint8)
        codec.encode_into(encoded, sources)
        stored = torch.empty(codec.stored_nbytes, dtype=torch.uint8)
        codec.decode_into(encoded, stored)
        for coding, source in zip(codec.codings, sources):
            if coding.format is not StreamFormat.STORED:
                source.copy_(stored[coding.stored_offset:coding.stored_offset + coding.stored_nbytes])
                changed.append(coding.name)
    return changed


def loaded_forward(patcher) -> torch.Tensor:
    mm.load_models_gpu([patcher])
    return wan_forward(patcher.model.diffusion_model)


def lora_tensors(name: str) -> dict:
    return comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("loras", name), safe_load=True)


@pytest.mark.parametrize("fmt", ["q8_0", "fp8_e4m3fn"])
def test_a_streamed_unet_in_a_stream_format_computes_cores_model_with_the_formats_values(fmt):
    core = core_model()
    names = with_format_values(core, fmt)
    expected = loaded_forward(core)
    plain = loaded_forward(core_model())
    mm.unload_all_models()
    unet, _ = load_unet(FILE, "default", settings(fmt))
    state = DisTorchState.of(unet.model)
    assert state.stream_format == fmt and all(b.decodes for b in state.plan.blocks)
    got = loaded_forward(unet)
    assert len(names) >= 24 and (expected - plain).abs().max() > 0, "the format must change the weights"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    mm.unload_all_models()  # core's unpatch moves the model to its offload device: placeholders stay as they are
    torch.testing.assert_close(loaded_forward(unet), got, rtol=0, atol=0)
    held = sum(n for _, n in state.placement.streamer.staged_encoded().values())
    saved = state.plan.streamed_stored_bytes - held
    assert saved > 0 and unet.get_ram_usage() == comfy.model_management.module_size(unet.model) - saved


def test_loras_on_q8_0_streamed_blocks_equal_loras_on_the_dequantized_weights(merge_calls):
    """A rank-32 LoRA on every attention and FFN matrix (the side path, beside the decoded layer) and a LoHa on one
    FFN matrix (core's LowVramPatch, merged into the decoded weight each forward)."""
    unet, _ = load_unet(FILE, "default", settings("q8_0"))
    name = next(n for n, _ in DisTorchState.of(unet.model).streamed_modules(unet.model) if n.endswith(".ffn.0"))
    generator = torch.Generator().manual_seed(1)
    loha = {f"{name}.hada_w{i}_{p}": (torch.randn(*shape, generator=generator) * 0.1).half()
            for i in (1, 2) for p, shape in (("a", (256, 4)), ("b", (4, 128)))}

    def patched(patcher):
        patcher = comfy.sd.load_lora_for_models(patcher, None, lora_tensors(LORA_A), 0.8, 0)[0]
        return comfy.sd.load_lora_for_models(patcher, None, loha, 1.0, 0)[0]

    core = core_model()
    with_format_values(core, "q8_0")
    expected = loaded_forward(patched(core))
    plain = loaded_forward(core)
    mm.unload_all_models()
    ours = patched(unet)
    mm.load_models_gpu([ours])
    layer = ours.model.get_submodule(name)
    assert isinstance(layer.weight_function[0], comfy.model_patcher.LowVramPatch)
    merge_calls.clear()
    got = wan_forward(ours.model.diffusion_model)
    assert set(merge_calls) == {f"{name}.weight"}, "the LoHa key merges into the decoded weight each forward"
    assert (expected - plain).norm() > 0.05 * plain.norm(), "the LoRAs must change the output"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_model_streamed_in_a_stream_format_refuses_to_be_saved():
    """Its encoded weights have no stored bytes (placeholders read NaN): saving fails with one clear message rather
    than writing NaN. Core's checkpoint save loads the model with force_patch_weights (before 0.33) or reads
    `model_state_dict_for_saving` (0.33+)."""
    unet, _ = load_unet(FILE, "default", settings("q8_0"))
    with pytest.raises(RuntimeError, match="streams its blocks as q8_0.*load it with stream_format 'stored'"):
        mm.load_models_gpu([unet], force_patch_weights=True)
    mm.unload_all_models()
    if hasattr(comfy.model_patcher.ModelPatcher, "model_state_dict_for_saving"):
        with pytest.raises(RuntimeError, match="cannot be saved"):
            unet.model_state_dict_for_saving(unet.model.diffusion_model, "diffusion_model.")
    stored, _ = load_unet(FILE, "default", settings("stored"))
    mm.load_models_gpu([stored], force_patch_weights=True)  # the stored format saves as before
    mm.unload_all_models()
