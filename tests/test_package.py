"""The pack imports outside ComfyUI, and the library's public surface is in place."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_pack(name: str = "vdit_pack"):
    """Import the pack folder the way ComfyUI does: as a package from its __init__.py."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_pack_imports_without_comfyui():
    pack = load_pack()
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    # (not `"comfy" not in sys.modules`: pytest puts the pack's parent folder on sys.path, where a
    # ComfyUI checkout named "comfy" is a namespace package that the pack's guarded import finds)
    assert "comfy.model_management" not in sys.modules


def test_pack_does_not_shadow_comfyui_nodes_module():
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('p', r'{ROOT / '__init__.py'}', "
        f"submodule_search_locations=[r'{ROOT}']); "
        "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m); "
        f"assert sys.path[-1] == r'{ROOT}' and sys.path.count(r'{ROOT}') == 1; "
        "assert 'nodes' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_samplers_registry_is_public():
    from vdit_core.sampling import SAMPLERS

    expected = {"euler", "euler_ancestral", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "cogvideox_dpm", "unipc", "flow_euler"}
    assert expected <= set(SAMPLERS)
