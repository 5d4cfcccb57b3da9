"""The bundled workflows: only existing node types, widget values that fit, links between matching
types, and API copies equal to the UI ones."""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from test_package import load_pack

ROOT = Path(__file__).resolve().parents[1]
NODES = load_pack().NODE_CLASS_MAPPINGS
_spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "workflows" / "build_workflows.py")
_builder = importlib.util.module_from_spec(_spec)
sys.modules["build_workflows"] = _builder  # (its dataclasses look their module up)
_spec.loader.exec_module(_builder)
CORE = _builder.CORE  # the ComfyUI core nodes the workflows use
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute"}
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
        d_type = kind if d["type"] == "Reroute" and d_in["type"] == "*" else d_in["type"]  # (a reroute takes any type)
        assert s_out == kind == d_type, f"{path.name}: link {link_id} joins {s_out} to {d_in['type']}"
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
    # boxes with the title bar the frontend draws above each node's position (30 px; a reroute has none)
    title = {i: 0 if n["type"] == "Reroute" else 30 for i, n in nodes.items()}
    boxes = {i: (n["pos"][0], n["pos"][1] - title[i], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for i, n in nodes.items()}
    ids = list(boxes)
    for k, i in enumerate(ids):
        for j in ids[k + 1:]:
            a, b = boxes[i], boxes[j]
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (path.name, nodes[i]["type"], nodes[j]["type"])
    # no link behind a node: each link's curve as the frontend draws it (a cubic from the output,
    # leaving and entering sideways by a quarter of the link's length) stays out of every other node
    for _, src, s_slot, dst, d_slot, _ in wf["links"]:
        x0, y0 = boxes[src][2], nodes[src]["pos"][1] + 14 + 20 * s_slot
        x1, y1 = boxes[dst][0], nodes[dst]["pos"][1] + 14 + 20 * d_slot
        d = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 * 0.25
        xs, ys = (x0, x0 + d, x1 - d, x1), (y0, y0, y1, y1)
        curve = [tuple((1 - t) ** 3 * v[0] + 3 * (1 - t) ** 2 * t * v[1] + 3 * (1 - t) * t ** 2 * v[2] + t ** 3 * v[3] for v in (xs, ys))
                 for t in (k / 200 for k in range(201))]
        for i, (left, top, right, bottom) in boxes.items():
            if i not in (src, dst):
                assert not any(left < x < right and top < y < bottom for x, y in curve), (path.name, nodes[src]["type"], nodes[dst]["type"], nodes[i]["type"])


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_api_copy_matches_ui(path):
    ui = json.loads(path.read_text())
    api = json.loads((path.parent / "api" / path.name).read_text())
    ui_nodes = {str(n["id"]): n for n in ui["nodes"] if n["type"] not in FRONTEND_ONLY}
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert set(api) == set(ui_nodes)
    links = {lk[0]: lk for lk in ui["links"]}
    for nid, n in ui_nodes.items():
        a = api[nid]
        assert a["class_type"] == n["type"]
        for inp in n.get("inputs", []):
            if inp["link"] is not None:
                lk = links[inp["link"]]
                while nodes[lk[1]]["type"] == "Reroute":  # the page's reroutes: the API joins the nodes directly
                    lk = links[nodes[lk[1]]["inputs"][0]["link"]]
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
        assert e["url"].startswith("https://huggingface.co/") and "/resolve/main/" in e["url"] and e["url"].endswith(".safetensors"), e
        assert e["name"].endswith(".safetensors") and "/" not in e["name"], e
        shard = re.sub(r"-\d{5}-of-(\d{5})\.safetensors$", r"-00001-of-\1.safetensors", e["name"])  # a set's first shard is what loads
        assert (e["directory"], shard) in reads, (path.name, e, reads)
    assert len({e["url"] for e in entries}) == len(entries)  # the frontend keeps one entry per url
    # distinct names, and a name always means the same file (same folder, same source file name)
    for d, name in reads:
        assert any(e["directory"] == d and e["name"] == name for e in entries), f"{path.name}: nothing listed for models/{d}/{name}"
    if not reads:
        assert not entries  # the demo needs no downloads


def test_one_file_name_means_one_file_across_the_workflows():
    """A file two workflows list has one name and one folder (one download serves both), and no
    two different files share a name."""
    seen = {}
    for path in WORKFLOWS:
        for e in json.loads(path.read_text()).get("models", []):
            source = e["url"].split("/resolve/main/")[1]  # the same file of another release's repository
            assert seen.setdefault((e["directory"], e["name"]), source) == source, (path.name, e)


def _stand_ins(release: str, root: Path) -> dict[str, Path]:
    """Tiny random files of the kinds a release's downloads are, by the file name they stand for:
    the reference pipelines' weights (diffusers, or Open-Sora's released layout) and ComfyUI's
    single-file HunyuanDiT."""
    import tiny
    from safetensors.torch import load_file, save_file

    root.mkdir(parents=True, exist_ok=True)
    if not release.startswith("opensora"):
        pytest.importorskip("diffusers")  # the reference pipelines that write them
    if release.startswith("cogvideox"):
        variant = {"cogvideox-2b": "2b", "cogvideox-5b": "5b", "cogvideox-5b-i2v": "5b-i2v"}[release]
        # a single file has no config: the learned positions must cover the release's own grid
        grid = dict(sample_height=60, sample_width=90, sample_frames=49) if variant == "5b-i2v" else None
        _, folder = tiny.reference_pipeline(root, variant, transformer=grid)
        transformer = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
        keys = sorted(transformer)
        halves = [{k: transformer[k] for k in keys[: len(keys) // 2]}, {k: transformer[k] for k in keys[len(keys) // 2:]}]
        out = {"transformer": folder / "transformer" / "diffusion_pytorch_model.safetensors",
               "vae": folder / "vae" / "diffusion_pytorch_model.safetensors", "text_encoder": folder / "text_encoder" / "model.safetensors"}
        for i, half in enumerate(halves, 1):
            save_file(half, str(root / f"shard{i}.safetensors"))
            out[f"shard{i}"] = root / f"shard{i}.safetensors"
        return out
    if release.startswith("hunyuandit"):
        import test_hunyuandit

        _, folder = test_hunyuandit.reference(root, "v1.2", "ddim")
        return {"checkpoint": test_hunyuandit.comfy_checkpoint(root, folder, root / "hunyuan_dit.safetensors"),
                "bert_tokenizer": folder / "tokenizer"}
    fixture = ROOT / "tests" / "fixtures" / "opensora"
    tiny.tiny_t5().save_pretrained(root / "t5", safe_serialization=True)
    return {"transformer": fixture / "transformer" / "model.safetensors", "vae": fixture / "vae" / "model.safetensors",
            "text_encoder": root / "t5" / "model.safetensors"}


@pytest.mark.parametrize("release", sorted(_builder.RELEASE_FILES))
def test_fetching_exactly_the_listed_files_makes_the_loaders_load(release, tmp_path, monkeypatch):
    """What a workflow's missing-models dialog lists, put into the folders it names, is all its
    loaders need: tiny random files of the right kinds stand in for the downloads, and only
    ComfyUI's own tokenizer files (a folder here, ComfyUI's when run inside it) are added."""
    import shutil

    import tiny

    pack = load_pack()
    comfy = importlib.import_module(f"{pack.__name__}.nodes.comfy")
    files = _builder.RELEASE_FILES[release]
    stand_ins = _stand_ins(release, tmp_path / "build")
    models = tmp_path / "models"
    for d in files.downloads:
        target = models / d.directory / d.name
        target.parent.mkdir(parents=True, exist_ok=True)
        m = re.search(r"-(\d{5})-of-\d{5}\.safetensors$", d.name)
        kind = f"shard{int(m[1])}" if m else {"diffusion_models": "transformer", "text_encoders": "text_encoder", "checkpoints": "checkpoint"}.get(d.directory, d.directory)
        shutil.copy(stand_ins[kind], target)
    tokenizers = tmp_path / "comfy_tokenizers"  # ComfyUI's comfy/text_encoders holds these
    shutil.copytree(tiny.tokenizer_dir(str(tmp_path / "build")), tokenizers / "t5_tokenizer")
    if "bert_tokenizer" in stand_ins:
        shutil.copytree(stand_ins["bert_tokenizer"], tokenizers / "hydit_clip_tokenizer")
    monkeypatch.setattr(comfy, "tokenizer_root", lambda: tokenizers)
    if comfy.IN_COMFY:  # ComfyUI's folder registry, for this test only
        fp = comfy.folder_paths
        for kind in ("diffusion_models", "text_encoders", "vae", "checkpoints", comfy.MODEL_FOLDERS):
            monkeypatch.setitem(fp.folder_names_and_paths, kind, ([str(models / kind)], set(comfy.MODEL_EXTENSIONS)))
        monkeypatch.setattr(fp, "filename_list_cache", {})
    else:
        monkeypatch.setitem(comfy._paths, "models", str(models))
    listed = {json.dumps(d.entry(), sort_keys=True) for d in files.downloads}
    paths = [p for p in WORKFLOWS if {json.dumps(e, sort_keys=True) for e in json.loads(p.read_text()).get("models", [])} == listed]
    assert paths, f"no workflow lists {release}'s files"
    # outside ComfyUI (CI), the kept loaders with the same widgets stand in for the native ones
    kept = {} if comfy.IN_COMFY else {"VDITLoadModel": "VDITModelLoader", "VDITLoadVAE": "VDITVAELoader"}
    for path in paths:
        api = json.loads((path.parent / "api" / path.name).read_text())
        loaded = {}
        for node in (n for n in api.values() if n["class_type"] in _builder.LOADER_WIDGETS):
            cls = NODES[kept.get(node["class_type"], node["class_type"])]
            inputs = {**node["inputs"], ("dtype" if "dtype" in node["inputs"] else "weight_dtype"): "fp32"}
            for widget in _builder.LOADER_WIDGETS[node["class_type"]]:
                assert inputs[widget] in cls.INPUT_TYPES()["required"][widget][0], (path.name, inputs[widget])
            loaded[node["class_type"]] = getattr(cls(), cls.FUNCTION)(**inputs)[0]
        model, text_encoder = loaded["VDITLoadModel"], loaded["VDITTextEncoderLoader"]
        family = model.model.vdit_family if comfy.IN_COMFY else model.family
        assert text_encoder.family is family and family.name == release.split("-")[0], path.name
        with torch.no_grad():
            cond = text_encoder.family.encode_text(text_encoder.encoder, "a red circle moving right")
        assert all(torch.isfinite(v.float()).all() for v in cond.values()), path.name
        assert loaded["VDITLoadVAE"] is not None


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
