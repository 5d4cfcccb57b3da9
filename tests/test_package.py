"""The pack imports outside ComfyUI, and the library's public surface is in place."""

import ast
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


# vdit_core's floors, lowest first: a module imports modules of its own floor or lower ones
# (keys: the first name under vdit_core; "" is the package itself, the public API)
FLOORS = [
    # building blocks, the noise process, speed and memory options, reading weight files and
    # naming what one is
    {"attention", "layers", "fp8", "memory", "step_cache", "offload", "parallel", "detect", "checkpoint", "video_io",
     "schedules", "prediction", "sampling", "guidance", "timesteps"},
    {"models", "vae", "text"},  # the networks and the text encoders
    {"lora"},  # adapters on a loaded transformer
    {"families"},  # what the pipeline, nodes, CLI and trainer know of a kind of model
    {"pipeline"},  # text -> video
    {"", "generate", "train", "demo"},  # the entry points: public API, CLI, trainer, demo
]


def import_graph() -> dict[str, dict[str, int]]:
    """Each vdit_core module -> the vdit_core modules it imports, at module level or inside a
    function, with the line of the first such import."""
    files = {}
    for path in sorted((ROOT / "vdit_core").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: the package, `level - 1` packages up
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from package import module` imports that module; `from module import name`, the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in files and "." in target:  # `import a.b.c`: the longest module name
                    target = target.rpartition(".")[0]
                if target in files and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def floor(module: str) -> int | None:
    """The floor of a vdit_core module (None: not placed in FLOORS)."""
    key = module.split(".")[1] if "." in module else ""
    return next((i for i, names in enumerate(FLOORS) if key in names), None)


def test_every_module_has_a_floor():
    unplaced = [m for m in import_graph() if floor(m) is None]
    assert unplaced == [], f"put these modules on a floor in FLOORS: {unplaced}"


def test_no_import_runs_up_a_floor():
    graph = import_graph()
    up = [f"{m} (line {line}) imports {t}" for m, edges in graph.items() for t, line in edges.items() if floor(t) > floor(m)]
    assert up == []


def test_the_imports_have_no_circle():
    graph = import_graph()
    circles, done = [], set()

    def walk(path: list[str]) -> None:  # depth first; ``path``: the chain of imports being followed
        for target in graph[path[-1]]:
            if target in path:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                walk(path + [target])
        done.add(path[-1])

    for module in graph:
        if module not in done:
            walk([module])
    assert circles == []


def test_the_public_loaders_name_a_wrong_file_in_a_fresh_process(tmp_path):
    """Detection is a table the families register into (vdit_core.detect, below the loaders): the
    public API registers them first, so a loader says what a wrong file is when nothing else
    imported the families."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "vae.safetensors"
    save_file({"decoder.up_blocks.0.resnets.0.norm1.conv_y.conv.weight": torch.zeros(1)}, str(path))
    code = f"import vdit_core\ntry:\n    vdit_core.load_transformer(r'{path}')\nexcept ValueError as e:\n    print(e)\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout
    assert "expected a CogVideoX transformer, but this looks like a CogVideoX VAE" in out
