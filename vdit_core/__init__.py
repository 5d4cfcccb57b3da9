"""vdit_core: video diffusion transformers, their VAEs, samplers, LoRA and training.

The library under the vdit ComfyUI node pack; usable on its own:

    import vdit_core
    pipe = vdit_core.load_pipeline("path/to/CogVideoX-5b", device="cuda", dtype="bf16")
    frames = pipe(prompt="...", num_frames=49, steps=50, cfg=6.0, seed=0)
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vdit needs PyTorch, which it does not install for you (so it never replaces yours). "
        "Install it first: on a CPU machine `pip install torch`, with an NVIDIA GPU the command "
        "for your CUDA version from https://pytorch.org/get-started/locally/"
    ) from e

__version__ = "0.2.0"

# public API, imported on first use so that importing the package (e.g. by ComfyUI at start-up)
# does not pull in transformers
_LAZY = {
    "load_pipeline": ("pipeline", "load_pipeline"),
    "Pipeline": ("pipeline", "Pipeline"),
    "CogVideoXPipeline": ("pipeline", "Pipeline"),  # the name before the family layer
    "demo_model_path": ("demo", "demo_model_path"),
    "load_transformer": ("models.cogvideox", "load_transformer"),
    "load_vae": ("vae.cogvideox_vae", "load_vae"),
    "load_t5": ("text", "load_t5"),
    "write_video": ("video_io", "write_video"),
    "read_video": ("video_io", "read_video"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        # the families register their file signatures (vdit_core.detect), so that a loader's error
        # names what a wrong file looks like
        importlib.import_module(".families", __name__)
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'vdit_core' has no attribute {name!r}")
