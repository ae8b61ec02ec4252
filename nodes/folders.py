"""Model file lists: .gguf files live in core's folders under the pack's own folder keys.

Core's extension set for most keys is one shared object; adding ".gguf" to it would make GGUF
files appear in every core loader (checkpoints, LoRAs, VAEs). A separate key whose path list *is*
core's list (same object, so extra_model_paths and later additions apply) avoids that.
"""

import folder_paths

UNET_GGUF_KEY = "distorch_unet_gguf"
CLIP_GGUF_KEY = "distorch_clip_gguf"
_MODEL_EXTENSIONS = (".safetensors", ".sft", ".gguf")
_SHARED_PATHS = {UNET_GGUF_KEY: "diffusion_models", CLIP_GGUF_KEY: "text_encoders"}


def register_gguf_folders() -> None:
    for key, core_key in _SHARED_PATHS.items():
        if key not in folder_paths.folder_names_and_paths:
            paths = folder_paths.folder_names_and_paths[core_key][0]
            folder_paths.folder_names_and_paths[key] = (paths, {".gguf"})


def unet_files() -> list[str]:
    return _files("diffusion_models", UNET_GGUF_KEY)


def text_encoder_files() -> list[str]:
    return _files("text_encoders", CLIP_GGUF_KEY)


def vae_files() -> list[str]:
    return [f for f in folder_paths.get_filename_list("vae") if f.lower().endswith(_MODEL_EXTENSIONS)]


def full_path(core_key: str, name: str) -> str:
    """Resolves a listed file; raises FileNotFoundError naming the file and the folder."""
    key = {"diffusion_models": UNET_GGUF_KEY, "text_encoders": CLIP_GGUF_KEY}.get(core_key) \
        if name.lower().endswith(".gguf") else core_key
    return folder_paths.get_full_path_or_raise(key or core_key, name)


def _files(core_key: str, gguf_key: str) -> list[str]:
    register_gguf_folders()
    names = set(folder_paths.get_filename_list(core_key)) | set(folder_paths.get_filename_list(gguf_key))
    return sorted(n for n in names if n.lower().endswith(_MODEL_EXTENSIONS))
