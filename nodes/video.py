"""Saving frames as a video in ComfyUI's output folder."""

from __future__ import annotations

from vdit_core import families
from vdit_core.video_io import write_video

from . import comfy
from .sampling import first_release

FORMATS = ["mp4", "webm", "webp", "gif"]


class VDITSaveVideo:
    """IMAGE frames -> an mp4/webm/webp/gif in the output folder, shown in the UI."""

    @classmethod
    def INPUT_TYPES(cls):
        # frames carry no model, so the rate is asked for: it starts at the first release's, as the
        # other nodes' sizes and steps do, and the tooltip names each model's
        return {"required": {
            "images": ("IMAGE", {"tooltip": "the video's frames"}),
            "fps": ("FLOAT", {"default": float(first_release()["fps"]), "min": 0.1, "max": 120.0, "step": 0.1,
                              "tooltip": f"frames per second (the models': {families.quote('fps')})"}),
            "filename_prefix": ("STRING", {"default": "vdit/video", "tooltip": "folder/name inside ComfyUI's output folder; a number is appended"}),
            "format": (FORMATS, {"default": "mp4", "tooltip": "mp4 (H.264) plays everywhere; webm, animated webp and gif too"}),
        }}

    RETURN_TYPES = ()
    FUNCTION = "save"
    DESCRIPTION = "Saves frames as a video (mp4, webm, webp, gif) in the output folder and shows it: the end of a text-to-video graph."

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix):
        """A prefix that would leave the output folder is refused before the graph runs."""
        try:
            comfy.output_target(filename_prefix)
        except ValueError as e:
            return str(e)
        return True
    OUTPUT_NODE = True
    CATEGORY = "vdit"

    def save(self, images, fps, filename_prefix, format):
        folder, sub, prefix = comfy.output_target(filename_prefix)
        folder.mkdir(parents=True, exist_ok=True)
        taken = {p.name for p in folder.glob(f"{prefix}_*")}
        n = next(i for i in range(1, 10**6) if f"{prefix}_{i:05d}.{format}" not in taken)
        name = f"{prefix}_{n:05d}.{format}"
        write_video(folder / name, images, fps=fps)
        return {"ui": {"images": [{"filename": name, "subfolder": sub, "type": "output"}], "animated": (True,)}}
