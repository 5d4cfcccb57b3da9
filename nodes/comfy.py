"""ComfyUI's services for the nodes: devices, model folders, progress, previews and interrupts,
with plain fallbacks outside ComfyUI (so the node classes run in tests and scripts). The other
module that imports ComfyUI is ``native.py`` (ComfyUI's model objects), used only inside it.

Outside ComfyUI, model folders come from ``VDIT_MODELS_DIR`` (with ``diffusion_models/``,
``text_encoders/``, ``vae/``, ``loras/``, ``vdit/`` inside) and outputs go to ``VDIT_OUTPUT_DIR``
(default ``./output``); :func:`set_paths` overrides both.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

try:  # inside ComfyUI
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.utils
    import folder_paths

    IN_COMFY = True
except ImportError:  # a plain Python process
    mm = None
    folder_paths = None
    IN_COMFY = False

MODEL_EXTENSIONS = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")
_paths = {"models": os.environ.get("VDIT_MODELS_DIR", ""), "output": os.environ.get("VDIT_OUTPUT_DIR", "output")}


def set_paths(models: str | Path | None = None, output: str | Path | None = None) -> None:
    """Where model folders and outputs are, outside ComfyUI."""
    if models is not None:
        _paths["models"] = str(models)
    if output is not None:
        _paths["output"] = str(output)


MODEL_FOLDERS = "vdit"  # ComfyUI's name for models/vdit, where whole model folders go


def register_folders() -> None:
    """Register ``models/vdit`` (model folders of any family) with ComfyUI."""
    if IN_COMFY and MODEL_FOLDERS not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(MODEL_FOLDERS, os.path.join(folder_paths.models_dir, MODEL_FOLDERS), is_default=True)


def _dirs(kind: str) -> list[str]:
    if IN_COMFY:
        try:
            return list(folder_paths.get_folder_paths(kind))
        except KeyError:
            return []
    return [os.path.join(_paths["models"], kind)] if _paths["models"] else []


def list_files(kind: str) -> list[str]:
    """Weight files in a model folder kind (``diffusion_models``, ``text_encoders``, ``vae``, ``loras``);
    a set of shards (``NAME-00001-of-00002.safetensors`` ...) shows as its first file, which loads them all."""
    if IN_COMFY:
        names = [f for f in folder_paths.get_filename_list(kind) if f.lower().endswith(MODEL_EXTENSIONS)]
    else:
        names = []
        for d in _dirs(kind):
            if os.path.isdir(d):
                for root, _, files in os.walk(d):
                    names += [os.path.relpath(os.path.join(root, f), d) for f in files if f.lower().endswith(MODEL_EXTENSIONS)]
    return sorted(f for f in names if not _later_shard(f))


def _later_shard(name: str) -> bool:
    """A shard other than the first of its set (the first stands for the set in the lists)."""
    from vdit_core.checkpoint import SHARD

    m = SHARD.match(os.path.basename(name))
    return m is not None and int(m["index"]) > 1


def list_model_folders() -> list[str]:
    """Model folders under ``models/vdit`` whose layout a registered family recognises, or whose
    transformer weights it does (an incomplete download: offered, and refused with what it lacks
    when loaded)."""
    from vdit_core import families

    out = []
    for d in _dirs(MODEL_FOLDERS):
        if os.path.isdir(d):
            out += [name for name in os.listdir(d) if _recognised(families, Path(d) / name)]
    return sorted(set(out))


def _recognised(families, folder: Path) -> bool:
    try:
        return folder.is_dir() and (any(f.recognises_folder(folder) for f in families.FAMILIES.values())
                                    or families.weights_family(folder) is not None)
    except ValueError:  # an unreadable config: not offered (loading it by path says why)
        return False


def full_path(kind: str, name: str) -> Path:
    """The file or folder a combo entry names; a clear error when it is gone."""
    for d in _dirs(kind):
        p = Path(d) / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{name!r} is not in any {kind} model folder ({', '.join(_dirs(kind)) or 'none configured'})")


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory() if IN_COMFY else _paths["output"])


def output_target(filename_prefix: str) -> tuple[Path, str, str]:
    """(folder, subfolder, file prefix) inside the output folder for a node's ``filename_prefix``
    ("sub/dir/name"). Every node that writes asks here: a prefix that would leave the output
    folder (``..``, an absolute path) is refused before anything is written, as ComfyUI's own
    save nodes do."""
    out = output_dir().resolve()
    sub, _, prefix = filename_prefix.replace("\\", "/").rpartition("/")
    folder = (out / sub).resolve()
    inside = folder == out or out in folder.parents
    if os.path.isabs(filename_prefix) or not inside or prefix in ("", ".", ".."):
        raise ValueError(f"filename_prefix={filename_prefix!r}: files are written inside ComfyUI's output folder only; "
                         f"use a relative prefix such as 'vdit/video'")
    return folder, folder.relative_to(out).as_posix() if folder != out else "", prefix


def tokenizer_root() -> Path | None:
    """ComfyUI's folder of tokenizers (``t5_tokenizer``, ``hydit_clip_tokenizer``, ...), when
    running inside ComfyUI: single text-encoder files find their tokenizer there."""
    if not IN_COMFY:
        return None
    import comfy.text_encoders

    # (a namespace package in some versions, 0.3.64 among them: no __file__, but a __path__)
    return Path(next(iter(comfy.text_encoders.__path__)))


# ----------------------------------------------------------------------------------------------
# devices and model management


def _fallback_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def devices(role: str) -> tuple[torch.device, torch.device]:
    """(load device, offload device) for ``role`` in {"diffusion", "text", "vae"}."""
    if not IN_COMFY:
        d = _fallback_device()
        return d, d
    if role == "text":
        return mm.text_encoder_device(), mm.text_encoder_offload_device()
    if role == "vae":
        return mm.vae_device(), mm.vae_offload_device()
    return mm.get_torch_device(), mm.unet_offload_device()


def intermediate_device() -> torch.device:
    return mm.intermediate_device() if IN_COMFY else torch.device("cpu")


class _Held(torch.nn.Module):
    """What ComfyUI's ModelPatcher manages: it assigns ``model.device`` on every load and offload,
    which a transformers model (T5EncoderModel) refuses: there ``device`` is a read-only property."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.inner = module
        self.device = next(module.parameters()).device


class Managed:
    """A model under ComfyUI's memory management: loaded to its device on :meth:`load`, offloaded
    when ComfyUI needs the memory or the user frees it. Outside ComfyUI: moved once, kept.

    A transformer (``blocks`` given) that does not fit in the free memory ComfyUI can make, or
    whose ``gpu_blocks`` is set, runs with block swap instead (:mod:`vdit_core.offload`): its
    other blocks stream from CPU memory as they run."""

    def __init__(self, module: torch.nn.Module, role: str, blocks: list | None = None, gpu_blocks: int | None = None):
        self.module = module
        self.load_device, self.offload_device = devices(role)
        self.blocks, self.gpu_blocks, self.swap = blocks, gpu_blocks, None
        if IN_COMFY:
            held = type(type(module).__name__, (_Held,), {})(module)  # ComfyUI's log names the class it loads
            self.patcher = comfy.model_patcher.ModelPatcher(held, self.load_device, self.offload_device)
        else:
            self.patcher = None

    def _blocks_on_device(self) -> int | None:
        """Blocks to keep on the device (None: load the whole model): the user's count, else what
        fits once ComfyUI has freed what it can, leaving its inference reserve."""
        from vdit_core.offload import blocks_that_fit, module_bytes

        if self.blocks is None:
            return None
        if self.load_device.type != "cuda":
            if self.gpu_blocks is not None:
                logging.warning(f"vdit: gpu_blocks={self.gpu_blocks} ignored: block swap streams to a CUDA GPU, and this model runs on {self.load_device.type}")
            return None
        if self.gpu_blocks is not None:
            return self.gpu_blocks
        if not IN_COMFY or any(m is self.patcher for m in mm.loaded_models()):  # already loaded whole: it fit
            return None
        reserve = mm.minimum_inference_memory()
        mm.free_memory(module_bytes(self.module) + reserve, self.load_device)
        return blocks_that_fit(self.module, self.blocks, mm.get_free_memory(self.load_device), reserve)

    def load(self) -> torch.device:
        if self.swap is not None:
            return self.load_device
        for other in list(_SWAPPED):  # ComfyUI does not see their memory: they make room themselves
            other.release()
        kept = self._blocks_on_device()
        if kept is not None:
            from vdit_core.offload import BlockSwap

            self.swap = BlockSwap(self.module, self.blocks, self.load_device, kept)
            _SWAPPED.append(self)
            logging.info(f"vdit: block swap: {kept} of {len(self.blocks)} transformer blocks on {self.load_device}, the rest streamed from CPU memory")
        elif self.patcher is not None:
            # full load: our modules are plain torch ones, which ComfyUI cannot stream in low-VRAM mode
            mm.load_models_gpu([self.patcher], force_full_load=True)
        else:
            self.module.to(self.load_device)
        return self.load_device

    def release(self) -> None:
        """A block-swapped model hands the GPU back (to its offload device) before another model
        loads; its next :meth:`load` sets block swap up again."""
        if self.swap is not None:
            self.swap.detach()
            self.module.to(self.offload_device)
            self.swap = None
            _SWAPPED.remove(self)
            free_cache()


_SWAPPED: list[Managed] = []  # models running with block swap: outside ComfyUI's accounting


def free_cache() -> None:
    if IN_COMFY:
        mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# progress, previews, interrupts


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed cancel."""
    if IN_COMFY:
        mm.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    if not IN_COMFY:
        return False
    try:
        from comfy.cli_args import LatentPreviewMethod, args

        return args.preview_method != LatentPreviewMethod.NoPreviews
    except (ImportError, AttributeError):
        return False


class Progress:
    """ComfyUI's ProgressBar (which also checks for interrupts) or a tqdm bar."""

    def __init__(self, total: int, desc: str = ""):
        self.total = total
        if IN_COMFY:
            self.bar = comfy.utils.ProgressBar(total)
            self.tqdm = None
        else:
            from tqdm.auto import tqdm

            self.bar = None
            self.tqdm = tqdm(total=total, desc=desc, leave=False)

    def update(self, n: int = 1, preview=None) -> None:
        if self.bar is not None:
            self.bar.update_absolute(self.bar.current + n, self.total, ("JPEG", preview, 512) if preview is not None else None)
        else:
            self.tqdm.update(n)

    def update_to(self, n: int) -> None:
        """Move the bar to ``n`` of its total."""
        if self.bar is not None:
            self.bar.update_absolute(n, self.total)
        else:
            self.tqdm.update(n - self.tqdm.n)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
