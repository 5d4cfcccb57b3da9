"""vdit_core: video diffusion transformers, their VAEs, samplers, LoRA and training.

The library under the vdit ComfyUI node pack; usable on its own.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vdit needs PyTorch, which it does not install for you (so it never replaces yours). "
        "Install it first: on a CPU machine `pip install torch`, with an NVIDIA GPU the command "
        "for your CUDA version from https://pytorch.org/get-started/locally/"
    ) from e

__version__ = "0.1.0"
