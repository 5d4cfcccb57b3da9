"""The bundled workflows: only existing node types, widget values that fit, links between matching
types, and API copies equal to the UI ones."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import pytest

from test_package import load_pack

ROOT = Path(__file__).resolve().parents[1]
NODES = load_pack().NODE_CLASS_MAPPINGS
_spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
_builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_builder)
CORE = _builder.CORE  # the ComfyUI core nodes the workflows use
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def _ours(node_type):
    """(socket inputs [(name, type)], widgets [(name, kind, opts)], outputs) from INPUT_TYPES."""
    spec = NODES[node_type].INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                widgets.append((name, kind, opts))
            else:
                sockets.append((name, kind))
    return sockets, widgets, list(NODES[node_type].RETURN_TYPES)


def _expected_widget_values(widgets):
    out = []
    for name, kind, opts in widgets:
        out.append((name, kind, opts))
        if opts.get("control_after_generate"):
            out.append(("control_after_generate", ["fixed", "increment", "decrement", "randomize"], {}))
    return out


def _check_value(where, kind, opts, value):
    if isinstance(kind, list):
        if kind and all(not str(k).endswith((".safetensors", "/", ")")) for k in kind):  # static choices only
            assert value in kind, f"{where}: {value!r} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
        assert opts.get("min", -2**64) <= value <= opts.get("max", 2**64), where
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)), where
        assert opts.get("min", -1e30) <= value <= opts.get("max", 1e30), where
    elif kind == "STRING":
        assert isinstance(value, str), where
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), where


def test_there_are_workflows():
    # the file names are the titles of the Templates menu (ComfyUI shows them as they are)
    names = {p.stem for p in WORKFLOWS}
    assert names == {"vdit demo - text to video (no downloads)", "CogVideoX 2B - text to video", "CogVideoX 5B - text to video",
                     "CogVideoX 5B - text to video with a LoRA", "CogVideoX 5B - image to video", "CogVideoX 5B - video to video",
                     "HunyuanDiT 1.2 - text to image", "HunyuanDiT 1.2 - image to image", "Open-Sora 1.2 - text to video",
                     "Open-Sora 1.2 - image to video"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_is_consistent(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    links = {lk[0]: lk for lk in wf["links"]}
    assert any(n["type"] in FRONTEND_ONLY for n in nodes.values()), "each workflow has a note on its files"
    for n in nodes.values():
        t = n["type"]
        assert t in NODES or t in CORE or t in FRONTEND_ONLY, f"{path.name}: unknown node type {t}"
        if t in FRONTEND_ONLY or t in CORE:
            continue
        sockets, widgets, outputs = _ours(t)
        assert [i["name"] for i in n["inputs"]] == [s[0] for s in sockets], f"{path.name}: {t} inputs"
        expected = _expected_widget_values(widgets)
        assert len(n["widgets_values"]) == len(expected), f"{path.name}: {t} widget count"
        for (name, kind, opts), value in zip(expected, n["widgets_values"]):
            _check_value(f"{path.name}: {t}.{name}", kind, opts, value)
        assert [o["type"] for o in n["outputs"]] == outputs
    for link_id, src, src_slot, dst, dst_slot, kind in links.values():
        s, d = nodes[src], nodes[dst]
        s_out = s["outputs"][src_slot]["type"] if s["type"] not in CORE else CORE[s["type"]]["outputs"][src_slot]
        d_in = d["inputs"][dst_slot]
        assert s_out == kind == d_in["type"], f"{path.name}: link {link_id} joins {s_out} to {d_in['type']}"
        assert d_in["link"] == link_id and link_id in s["outputs"][src_slot]["links"]
    for n in nodes.values():  # every socket input of our nodes is connected (optional ones may not be)
        if n["type"] in NODES:
            required = NODES[n["type"]].INPUT_TYPES()["required"]
            for i in n.get("inputs", []):
                assert i["link"] is not None or i["name"] not in required, f"{path.name}: {n['type']}.{i['name']} unconnected"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_layout_flows_left_to_right_without_overlaps(path):
    wf = json.loads(path.read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    for _, src, _, dst, _, _ in wf["links"]:  # data flows left to right
        assert nodes[src]["pos"][0] + nodes[src]["size"][0] <= nodes[dst]["pos"][0], (path.name, nodes[src]["type"], nodes[dst]["type"])
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in nodes.values()]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (path.name, a, b)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_copy_matches_ui(path):
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    assert set(api) == set(ui_nodes)
    links = {lk[0]: lk for lk in ui["links"]}
    for nid, n in ui_nodes.items():
        a = api[nid]
        assert a["class_type"] == n["type"]
        for inp in n.get("inputs", []):
            if inp["link"] is not None:
                lk = links[inp["link"]]
                assert a["inputs"][inp["name"]] == [str(lk[1]), lk[2]]
        if n["type"] in NODES:
            values = [v for (name, _, _), v in zip(_expected_widget_values(_ours(n["type"])[1]), n["widgets_values"])
                      if name != "control_after_generate"]
            names = [w[0] for w in _ours(n["type"])[1]]
            assert {k: a["inputs"][k] for k in names} == dict(zip(names, values))


def _loader_choices(wf):
    """(node type, widget value) of every loader in a UI workflow, demo excluded."""
    out = []
    for n in wf["nodes"]:
        if n["type"] in _builder.LOADER_WIDGETS:
            names = [w[0] for w in _ours(n["type"])[1]]
            for widget in _builder.LOADER_WIDGETS[n["type"]]:
                value = n["widgets_values"][names.index(widget)]
                if value != "vdit-demo (bundled)":
                    out.append((n["type"], value))
    return out


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_models_entries_name_what_the_loaders_read(path):
    """Each "models" entry (the frontend's missing-models dialog) lies in the directory, and under
    the folder or file, that one of the workflow's loaders reads; the frontend offers only
    .safetensors files from huggingface.co. Every model folder a loader names has entries."""
    location = importlib.import_module(f"{load_pack().__name__}.nodes.loaders").location  # the pack's, not ComfyUI's nodes.py

    wf = json.loads(path.read_text())
    reads = {location(value, NODES[t].KIND) for t, value in _loader_choices(wf)}
    entries = wf.get("models", [])
    for e in entries:
        assert set(e) == {"name", "url", "directory"}, e
        assert e["url"].startswith("https://huggingface.co/") and "/resolve/main/" in e["url"], e
        assert e["name"].endswith(".safetensors") and e["url"].endswith(e["name"].rsplit("/", 1)[-1]), e
        assert any(e["directory"] == d and (e["name"] == name or e["name"].startswith(name + "/")) for d, name in reads), (path.name, e, reads)
    assert len({e["url"] for e in entries}) == len(entries)  # the frontend keeps one entry per url
    for d, name in reads:
        if d == "vdit":
            assert any(e["name"].startswith(name + "/") for e in entries), f"{path.name}: nothing listed for models/vdit/{name}"
    if not reads:
        assert not entries  # the demo needs no downloads


def test_bundled_workflows_are_what_the_builder_writes():
    """The JSON files are the builder's output, whose sizes, steps, cfg and fps it reads from the
    families (rerun workflows/build_workflows.py after changing a family's facts)."""
    pack = load_pack()
    for name, graph in _builder.all_workflows(pack).items():
        assert (ROOT / "workflows" / f"{name}.json").read_text() == json.dumps(graph.ui(), indent=1) + "\n", name
        assert (ROOT / "workflows" / "api" / f"{name}.json").read_text() == json.dumps(graph.api(), indent=1) + "\n", name


def test_hunyuandit_workflows_say_their_steps_are_a_speed_choice():
    from vdit_core import families

    release = families.release_facts(families.get("hunyuandit"), families.get("hunyuandit").presets["hunyuandit-v1.2"])
    for path in (p for p in WORKFLOWS if p.stem.startswith("HunyuanDiT")):
        wf = json.loads(path.read_text())
        note = next(n for n in wf["nodes"] if n["type"] == "Note")["widgets_values"][0]
        api = json.loads((path.parent / "api" / path.name).read_text())
        steps = next(n for n in api.values() if n["class_type"] in ("VDITSampler", "KSampler"))["inputs"]["steps"]
        assert steps == _builder.HUNYUAN_WORKFLOW_STEPS < release["steps"], path.name
        assert f"{steps} steps here, for speed" in note and f"the release's own inference uses {release['steps']}" in note, note
