"""What ComfyUI's registry, ComfyUI-Manager and the node library read of the pack: its metadata,
its dependencies (never torch), the nodes' help pages and the templates' thumbnails."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

from test_package import load_pack  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TORCH = {"torch", "torchvision", "torchaudio"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_installing_the_pack_never_touches_torch():
    """ComfyUI-Manager installs requirements.txt, pip the project's dependencies: neither names
    torch, torchvision or torchaudio (a requirement pip may satisfy by replacing the user's CUDA
    build)."""
    lines = [x for x in (ROOT / "requirements.txt").read_text().splitlines() if x.strip() and not x.lstrip().startswith("#")]
    declared = {_name(x) for x in PYPROJECT["project"]["dependencies"]}
    assert lines and declared
    assert not TORCH & {_name(x) for x in lines}
    assert not TORCH & declared
    assert {_name(x) for x in lines} == declared  # one list of dependencies, written twice for the two installers


def test_registry_metadata_is_present_and_true():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].startswith("https://raw.githubusercontent.com/") and PYPROJECT["project"]["urls"]["Repository"].split("github.com/")[1] in comfy["Icon"]
    icon = ROOT / comfy["Icon"].split("/main/", 1)[1]  # the file the URL serves from the repository
    with Image.open(icon) as img:
        assert img.size[0] == img.size[1] >= 64
    # the range starts at the version the pack is tested on (tests/test_native*.py, ComfyUI 0.3.64)
    assert comfy["requires-comfyui"] == ">=0.3.64"
    version = PYPROJECT["project"]["version"]
    import vdit_core

    assert vdit_core.__version__ == version and re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert f"## {version} " in (ROOT / "CHANGELOG.md").read_text()
    ignored = (ROOT / ".comfyignore").read_text().split()
    assert {"tests/", "bench/"} <= set(ignored)
    assert not {"vdit_core/", "nodes/", "workflows/", "web/"} & set(ignored)


def _help_builder():
    spec = importlib.util.spec_from_file_location("build_help", ROOT / "web" / "build_help.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_help"] = module
    spec.loader.exec_module(module)
    return module


def test_every_node_has_the_help_page_the_builder_writes():
    """ComfyUI's node library shows ``<WEB_DIRECTORY>/docs/<NodeName>.md`` in its help panel; each
    page is the builder's output (rerun ``python web/build_help.py`` after changing a node)."""
    pack = load_pack()
    assert pack.WEB_DIRECTORY == "./web"
    pages = _help_builder().pages(pack)
    docs = ROOT / "web" / "docs"
    assert set(pages) == {f"{n}.md" for n in pack.NODE_CLASS_MAPPINGS} == {p.name for p in docs.glob("*.md")}
    for name, text in pages.items():
        assert (docs / name).read_text() == text, f"web/docs/{name} is stale: run python web/build_help.py"
        assert "## Outputs" in text and "## Example" in text, name
        node = pack.NODE_CLASS_MAPPINGS[name.removesuffix(".md")]
        for section in ("required", "optional"):
            for inp in node.INPUT_TYPES().get(section, {}):
                assert f"- **`{inp}`** (" in text, (name, inp)


def test_the_pages_state_the_families_facts():
    from vdit_core import families

    text = (ROOT / "web" / "docs" / "VDITLoadModel.md").read_text()
    for family in families.FAMILIES.values():
        for preset, config in family.presets.items():
            r = families.release_facts(family, config)
            frames = "1 frame (an image)" if r["frame_rule"] == "1" else f"{r['frame_rule']} frames (trained {r['frames']})"
            assert f"- **{family.label}** `{preset}`: {frames}, {r['width']}x{r['height']} " in text


def test_every_template_has_a_thumbnail():
    """The Templates menu shows ``<name>.jpg`` beside each workflow: at least 64 px, not one colour."""
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    assert workflows
    for path in workflows:
        with Image.open(path.with_suffix(".jpg")) as img:
            assert min(img.size) >= 64, path.name
            pixels = np.asarray(img.convert("L"), dtype=np.float32)
        assert pixels.std() > 10, path.name


def test_the_superseded_nodes_are_deprecated_and_no_workflow_uses_them():
    """vdit's own node set stays for saved workflows, marked deprecated (hidden from ComfyUI's
    search); the bundled workflows use none of it."""
    import json

    pack = load_pack()
    old = {n for n, c in pack.NODE_CLASS_MAPPINGS.items() if getattr(c, "DEPRECATED", False)}
    assert old == set(importlib.import_module(f"{pack.__name__}.nodes").REPLACED_BY)
    assert "VDITSampler" in old and "VDITLoadModel" not in old and "VDITTextEncoderLoader" not in old
    for path in (ROOT / "workflows").glob("*.json"):
        assert not old & {n["type"] for n in json.loads(path.read_text())["nodes"]}, path.name


def test_the_page_gets_the_size_presets_of_the_loaded_models_family(tmp_path, monkeypatch):
    """The route behind the Empty Latent Video's narrowed preset lists: a loader choice's family
    presets, and a refusal (no path opened) for a name the loader does not offer."""
    pack = load_pack()
    routes = importlib.import_module(f"{pack.__name__}.nodes.routes")
    demo = routes.family_presets("vdit-demo (bundled)")
    assert demo["family"] == "CogVideoX" and demo["resolutions"] == ["CogVideoX 720x480", "CogVideoX 480x720", "CogVideoX 1360x768", "CogVideoX 768x1360"]
    assert demo["durations"] == []
    assert routes.family_presets("../../etc/passwd") == {"error": "'../../etc/passwd' is not one of VDIT Load Model's choices"}
    import shutil

    comfy = importlib.import_module(f"{pack.__name__}.nodes.comfy")
    (tmp_path / "diffusion_models").mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "opensora" / "transformer" / "model.safetensors", tmp_path / "diffusion_models" / "os.safetensors")
    if not comfy.IN_COMFY:
        monkeypatch.setitem(comfy._paths, "models", str(tmp_path))
        got = routes.family_presets("os.safetensors")
        assert got["family"] == "Open-Sora" and len(got["resolutions"]) == 20 and got["durations"][1] == "Open-Sora 2s (51 frames)"
        assert all(r.startswith("Open-Sora ") for r in got["resolutions"] + got["durations"])


def test_search_aliases_name_each_current_node_by_what_users_type():
    """ComfyUI publishes SEARCH_ALIASES to its node search (newer versions): the terms users try
    lead to the node that does it; every current node has some, no deprecated one has any."""
    pack = load_pack()
    nodes = pack.NODE_CLASS_MAPPINGS
    for term in ("cogvideo", "hunyuan", "open-sora", "opensora"):
        assert term in nodes["VDITLoadModel"].SEARCH_ALIASES
    assert "video" in nodes["VDITEmptyLatentVideo"].SEARCH_ALIASES and "sampler" in nodes["VDITSamplerSelect"].SEARCH_ALIASES
    for name, cls in nodes.items():
        assert bool(getattr(cls, "SEARCH_ALIASES", None)) != bool(getattr(cls, "DEPRECATED", False)), name
