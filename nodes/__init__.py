"""ComfyUI nodes: thin adapters over vdit_core's public API."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
