"""The pack's one HTTP route, for its page script (web/vdit_presets.js): the size presets of the
model family a loader's choice holds, so that the Empty Latent Video lists only those of the
connected model."""

from __future__ import annotations

from vdit_core import families

from . import comfy
from .loaders import VDITLoadModel, resolve, sources


def family_presets(choice: str) -> dict:
    """{"family", "resolutions", "durations"} of a VDIT Load Model choice; a one-line ``error``
    (and no family) for a choice the loader does not offer or whose weights are not recognised."""
    if choice not in sources(VDITLoadModel.KIND):  # (only names the loader lists: no path from the page is opened)
        return {"error": f"{choice!r} is not one of VDIT Load Model's choices"}
    try:
        path, folder = resolve(choice, VDITLoadModel.KIND)
        family = families.for_folder(path, "transformer") if folder else families.for_file(path, "transformer")
    except (OSError, ValueError) as e:
        return {"error": str(e).splitlines()[0]}
    prefix = family.label + " "
    return {"family": family.label, "resolutions": [c for c in families.resolution_choices() if c.startswith(prefix)],
            "durations": [c for c in families.duration_choices() if c.startswith(prefix)]}


def register() -> None:
    """Add the route to ComfyUI's server (inside ComfyUI only)."""
    if not comfy.IN_COMFY:
        return
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return

    @server.routes.get("/vdit/family_presets")
    async def _family_presets(request):
        out = family_presets(request.query.get("model", ""))
        return web.json_response(out, status=404 if "error" in out else 200)
