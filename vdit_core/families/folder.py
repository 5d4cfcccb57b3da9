"""What a diffusers model folder says about sampling: its scheduler and ``_vdit_defaults``."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import read_json

# the diffusers scheduler classes a model folder may name, and the sampler each corresponds to
SCHEDULER_SAMPLERS = {
    "CogVideoXDDIMScheduler": "ddim",
    "DDIMScheduler": "ddim",
    "CogVideoXDPMScheduler": "cogvideox_dpm",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral",
    "UniPCMultistepScheduler": "unipc",
}


def folder_defaults(folder: Path | None) -> tuple[dict | None, str, dict]:
    """What a model folder says about sampling: (its scheduler config or None, the sampler its
    scheduler class corresponds to ("ddim" when unknown), the ``_vdit_defaults`` of its
    model_index.json: steps, cfg, sampler, name)."""
    if folder is None:
        return None, "ddim", {}
    folder = Path(folder)
    raw, sampler = None, "ddim"
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.exists():
        raw = read_json(sched)
        sampler = SCHEDULER_SAMPLERS.get(raw.get("_class_name", ""), "ddim")
    index = folder / "model_index.json"
    extra = read_json(index).get("_vdit_defaults", {}) if index.exists() else {}
    return raw, sampler, extra
