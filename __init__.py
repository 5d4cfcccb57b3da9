"""ComfyUI entry point of the vdit node pack.

ComfyUI imports this folder as a package and reads NODE_CLASS_MAPPINGS. Nothing here needs
ComfyUI, so the pack also imports (and its nodes run) outside it.
"""

import os
import sys

# ComfyUI-Manager installs requirements.txt, not this package: make the vdit_core folder next to
# this file importable. Appended, not prepended, so this pack's nodes/ never shadows ComfyUI's
# own top-level ``nodes`` module, and a pip-installed (e.g. editable) vdit_core still wins.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

# served by ComfyUI at /extensions/<this folder>/: the nodes' help pages (docs/<NodeName>.md, shown
# in the node library's help panel) and the pack's icon
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
