"""Write the bundled workflows, UI format (``workflows/*.json``) and API format
(``workflows/api/*.json``), from one definition each, so the two never disagree.

    python workflows/build_workflows.py

Widget order comes from the nodes' own INPUT_TYPES; the few ComfyUI core nodes used are
described in CORE below.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# ComfyUI core nodes the workflows use: (inputs in order: name, type or "WIDGET"), outputs,
# extra UI-only widget values appended after the inputs' (the upload buttons)
CORE = {
    "LoadImage": {"inputs": [("image", "WIDGET")], "outputs": ["IMAGE", "MASK"], "ui_extra": ["image"]},
    "LoadVideo": {"inputs": [("file", "WIDGET")], "outputs": ["VIDEO"], "ui_extra": ["image"]},
    "GetVideoComponents": {"inputs": [("video", "VIDEO")], "outputs": ["IMAGE", "AUDIO", "FLOAT"], "ui_extra": []},
    "ImageFromBatch": {"inputs": [("image", "IMAGE"), ("batch_index", "WIDGET"), ("length", "WIDGET")], "outputs": ["IMAGE"], "ui_extra": []},
    "SaveImage": {"inputs": [("images", "IMAGE"), ("filename_prefix", "WIDGET")], "outputs": [], "ui_extra": []},
    "KSampler": {"inputs": [("model", "MODEL"), ("seed", "WIDGET", {"control_after_generate": True}), ("steps", "WIDGET"), ("cfg", "WIDGET"),
                            ("sampler_name", "WIDGET"), ("scheduler", "WIDGET"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT"), ("denoise", "WIDGET")], "outputs": ["LATENT"], "ui_extra": []},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "outputs": ["IMAGE"], "ui_extra": []},
    "VAEEncode": {"inputs": [("pixels", "IMAGE"), ("vae", "VAE")], "outputs": ["LATENT"], "ui_extra": []},
    "RandomNoise": {"inputs": [("noise_seed", "WIDGET", {"control_after_generate": True})], "outputs": ["NOISE"], "ui_extra": []},
    "BasicScheduler": {"inputs": [("model", "MODEL"), ("scheduler", "WIDGET"), ("steps", "WIDGET"), ("denoise", "WIDGET")], "outputs": ["SIGMAS"],
                       "ui_extra": []},
    "SamplerCustomAdvanced": {"inputs": [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                                         ("latent_image", "LATENT")], "outputs": ["LATENT", "LATENT"], "ui_extra": []},
    "LoraLoaderModelOnly": {"inputs": [("model", "MODEL"), ("lora_name", "WIDGET"), ("strength_model", "WIDGET")], "outputs": ["MODEL"], "ui_extra": []},
    "CreateVideo": {"inputs": [("images", "IMAGE"), ("fps", "WIDGET"), ("audio", "AUDIO")], "outputs": ["VIDEO"], "ui_extra": []},
    "SaveVideo": {"inputs": [("video", "VIDEO"), ("filename_prefix", "WIDGET"), ("format", "WIDGET"), ("codec", "WIDGET")], "outputs": [], "ui_extra": []},
}
# vdit's samplers as KSampler's: DDIM (eta 0) is Euler on these sigmas, and KSampler's "simple"
# scheduler gives the releases' trailing timesteps. CogVideoX's DPM with dynamic CFG (the 5B
# releases') runs in SamplerCustomAdvanced with VDIT Sampler Select and VDIT Dynamic CFG Guider.
KSAMPLER = {"ddim": "ddim", "euler": "euler", "ddpm": "ddpm"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}

# What each release's workflows load, as single files in ComfyUI's standard folders, and where each
# file comes from: the workflow's "models" list, so the frontend's missing-models dialog names every
# file a run needs, its folder and its download, and fetching exactly those makes the workflow run
# (configs come from the family's presets, tokenizers from ComfyUI's own files). The frontend offers
# only .safetensors files from huggingface.co. Names are distinct, so that no file of one release
# overwrites another's: a browser saves each under its repository name (two are
# diffusion_pytorch_model.safetensors), and the dialog and the Notes say what to rename it to.


@dataclass(frozen=True)
class Download:
    """One file of a workflow's missing-models list: its folder and name in ComfyUI, and its source."""

    directory: str  # ComfyUI's model directory: diffusion_models, text_encoders, vae, checkpoints
    name: str  # the file name there, which the loader's widget names
    repo: str  # the Hugging Face repository it comes from
    file: str  # its path in the repository

    def entry(self) -> dict:
        return {"name": self.name, "url": f"https://huggingface.co/{self.repo}/resolve/main/{self.file}", "directory": self.directory}

    @property
    def choice(self) -> str:
        """The loader widget's value for it (a whole-model checkpoint is offered with a prefix)."""
        return ("checkpoints: " if self.directory == "checkpoints" else "") + self.name


@dataclass(frozen=True)
class Files:
    """What one release's loaders read: the transformer (the first of its shards stands for the
    set), the text encoder, the VAE."""

    model: tuple[Download, ...]
    text_encoder: Download
    vae: Download

    @property
    def downloads(self) -> list[Download]:
        return list(dict.fromkeys((*self.model, self.text_encoder, self.vae)))


# the T5-XXL encoder (google/t5-v1_1-xxl) CogVideoX and Open-Sora use, as ComfyUI's Flux and SD3
# workflows already have it in text_encoders/; its tokenizer is ComfyUI's own
T5XXL = Download("text_encoders", "t5xxl_fp16.safetensors", "comfyanonymous/flux_text_encoders", "t5xxl_fp16.safetensors")


def cogvideox_files(repo: str, stem: str, shards: int) -> Files:
    """A CogVideoX release from its diffusers repository: the transformer (as its shards), the VAE
    (one VAE serves every 1.0 release: their latent scaling is the transformer's), ComfyUI's T5."""
    if shards == 1:
        model = (Download("diffusion_models", f"{stem}.safetensors", repo, "transformer/diffusion_pytorch_model.safetensors"),)
    else:
        model = tuple(Download("diffusion_models", f"{stem}-{i:05d}-of-{shards:05d}.safetensors", repo,
                               f"transformer/diffusion_pytorch_model-{i:05d}-of-{shards:05d}.safetensors") for i in range(1, shards + 1))
    return Files(model, T5XXL, Download("vae", "cogvideox_vae.safetensors", repo, "vae/diffusion_pytorch_model.safetensors"))


# ComfyUI's own single-file HunyuanDiT (Tencent's comfyui README puts it in checkpoints/): the
# transformer, both text encoders (mT5's tokenizer inside) and the VAE; each loader takes its part
HUNYUAN_CHECKPOINT = Download("checkpoints", "hunyuan_dit_1.2.safetensors", "comfyanonymous/hunyuan_dit_comfyui", "hunyuan_dit_1.2.safetensors")
RELEASE_FILES = {
    "cogvideox-2b": cogvideox_files("THUDM/CogVideoX-2b", "cogvideox_2b", 1),
    "cogvideox-5b": cogvideox_files("THUDM/CogVideoX-5b", "cogvideox_5b", 2),
    "cogvideox-5b-i2v": cogvideox_files("THUDM/CogVideoX-5b-I2V", "cogvideox_5b_i2v", 2),
    "hunyuandit-v1.2": Files((HUNYUAN_CHECKPOINT,), HUNYUAN_CHECKPOINT, HUNYUAN_CHECKPOINT),
    "opensora-v1.2": Files((Download("diffusion_models", "opensora_v1.2_stdit3.safetensors", "hpcai-tech/OpenSora-STDiT-v3", "model.safetensors"),),
                           T5XXL, Download("vae", "opensora_v1.2_vae.safetensors", "hpcai-tech/OpenSora-VAE-v1.2", "model.safetensors")),
}


def files_note(files: Files, folder: str) -> str:
    """The Note's "Files:" part: each file, its folder and source, and the model-folder alternative."""
    listed = "; ".join(f"models/{d.directory}/{d.name} ({d.repo}, {d.file})" for d in files.downloads)
    renamed = any(d.name != d.file.rsplit("/", 1)[-1] for d in files.downloads)
    return (f"Files (the missing-models dialog lists them{'; a browser saves some under their repository names: rename each to the name given here' if renamed else ''}): "
            f"{listed}. Or put the model folder into ComfyUI/models/vdit/{folder} and pick it in all three loaders")


# the widget of each loader that names a model folder or file
LOADER_WIDGETS = {"VDITLoadModel": ("model",), "VDITTextEncoderLoader": ("text_encoder",), "VDITLoadVAE": ("vae",)}


def load_pack():
    spec = importlib.util.spec_from_file_location("vdit_pack", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["vdit_pack"] = module
    spec.loader.exec_module(module)
    return module


def node_signature(node_type: str, nodes: dict) -> dict:
    """{"inputs": [(name, type or WIDGET, options)], "outputs": [types], "ui_extra": [...]}"""
    if node_type in CORE:
        c = CORE[node_type]
        return {"inputs": [(n, t, opts[0] if opts else {}) for n, t, *opts in c["inputs"]], "outputs": c["outputs"], "ui_extra": c["ui_extra"]}
    cls = nodes[node_type]
    spec = cls.INPUT_TYPES()
    inputs = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind = value[0]
            opts = value[1] if len(value) > 1 else {}
            widget = isinstance(kind, list) or kind in WIDGET_TYPES
            inputs.append((name, "WIDGET" if widget else kind, opts))
    return {"inputs": inputs, "outputs": list(cls.RETURN_TYPES), "ui_extra": []}


class Graph:
    def __init__(self, pack):
        self.defs = pack.NODE_CLASS_MAPPINGS
        self.titles = pack.NODE_DISPLAY_NAME_MAPPINGS
        self.items: list[dict] = []
        self.downloads: list[Download] = []  # the files its loaders read (the "models" list)

    def add(self, node_type: str, title: str | None = None, **values) -> dict:
        node = {"id": len(self.items) + 1, "type": node_type, "title": title, "values": values}
        self.items.append(node)
        return node

    def note(self, text: str) -> dict:
        return self.add("Note", text=text)

    # -- UI format -----------------------------------------------------------------------------
    def _size(self, node: dict) -> tuple[int, int]:
        """About the size the frontend draws a node at: a title bar, a row per input/output slot
        pair, a row per widget (a multiline text box is taller)."""
        if node["type"] == "Note":
            return 380, 40 + 18 * (len(node["values"]["text"]) // 52 + 1)
        sig = node_signature(node["type"], self.defs)
        slots = max(sum(1 for _, kind, _ in sig["inputs"] if kind != "WIDGET"), len(sig["outputs"]))
        widgets = [(kind, opts) for _, kind, opts in sig["inputs"] if kind == "WIDGET"]
        height = 40 + 22 * slots + 26 * len(widgets)
        height += sum(24 for _, opts in widgets if opts.get("control_after_generate"))
        multiline = any(opts.get("multiline") for _, opts in widgets)
        if multiline:
            height += 90
        if node["type"] == "LoadImage":
            height += 240  # its image preview
        title = node["title"] or self.titles.get(node["type"], node["type"])
        return max(400 if multiline else 320, 8 * len(title) + 40), height  # the title must fit too

    def ui(self) -> dict:
        links, ui_nodes = [], []
        columns: dict[int, int] = {}
        depth = {}
        for node in self.items:
            srcs = [v[0] for v in node["values"].values() if isinstance(v, tuple)]
            depth[node["id"]] = 1 + max((depth[s["id"]] for s in srcs), default=-1)
        out_links: dict[tuple, list] = {}
        for node in self.items:
            if node["type"] == "Note":
                continue
            sig = node_signature(node["type"], self.defs)
            for slot, (name, kind, _) in enumerate(x for x in sig["inputs"] if x[1] != "WIDGET"):
                src = node["values"].get(name)
                if isinstance(src, tuple):
                    s_node, s_slot = src
                    s_type = node_signature(s_node["type"], self.defs)["outputs"][s_slot]
                    link_id = len(links) + 1
                    links.append([link_id, s_node["id"], s_slot, node["id"], slot, s_type])
                    out_links.setdefault((s_node["id"], s_slot), []).append(link_id)
        # left to right in the order data flows (a column per depth), each node sized to its slots
        # and widgets, stacked top to bottom in its column
        sizes = {node["id"]: self._size(node) for node in self.items}
        # a node sits in the column just before its first consumer (a loader next to what it feeds,
        # so its links do not run behind other columns); the last nodes keep their depth
        col_of = {node["id"]: depth[node["id"]] for node in self.items}
        for node in reversed(self.items):
            consumers = [n["id"] for n in self.items if any(isinstance(v, tuple) and v[0] is node for v in n["values"].values())]
            if consumers:
                col_of[node["id"]] = min(col_of[c] for c in consumers) - 1
        col_of.update({node["id"]: 0 for node in self.items if node["type"] == "Note"})
        n_cols = 1 + max(col_of.values())
        col_w = [max(sizes[i][0] for i, c in col_of.items() if c == k) if k in col_of.values() else 0 for k in range(n_cols)]
        col_x = [40 + sum(col_w[:k]) + 60 * k for k in range(n_cols)]
        # a column's nodes share its width, so links leave them at one edge (none behind a wider neighbour)
        sizes = {i: (col_w[col_of[i]], h) for i, (_, h) in sizes.items()}
        pos = {}
        for node in self.items:
            col = col_of[node["id"]]
            y = columns.get(col, 80)  # room above the first row for the title bars and node badges
            pos[node["id"]] = [col_x[col], y]
            columns[col] = y + sizes[node["id"]][1] + 50
        for order, node in enumerate(self.items):
            ui = {"id": node["id"], "type": node["type"], "pos": pos[node["id"]], "size": list(sizes[node["id"]]),
                  "flags": {}, "order": order, "mode": 0, "properties": {"Node name for S&R": node["type"]}}
            if node["title"]:
                ui["title"] = node["title"]
            if node["type"] == "Note":
                ui.update(inputs=[], outputs=[], widgets_values=[node["values"]["text"]], properties={}, color="#432", bgcolor="#653")
                ui_nodes.append(ui)
                continue
            sig = node_signature(node["type"], self.defs)
            ui["inputs"] = []
            for name, kind, _ in sig["inputs"]:
                if kind == "WIDGET":
                    continue
                src = node["values"].get(name)
                link = None
                if isinstance(src, tuple):
                    link = next(lk[0] for lk in links if lk[3] == node["id"] and lk[1] == src[0]["id"] and lk[2] == src[1])
                ui["inputs"].append({"name": name, "type": kind, "link": link})
            ui["outputs"] = [{"name": t, "type": t, "links": out_links.get((node["id"], i), []), "slot_index": i} for i, t in enumerate(sig["outputs"])]
            widgets = []
            for name, kind, opts in sig["inputs"]:
                if kind != "WIDGET":
                    continue
                if name not in node["values"]:
                    raise ValueError(f"{node['type']}: widget {name!r} needs a value")
                widgets.append(node["values"][name])
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
            ui["widgets_values"] = widgets + sig["ui_extra"]
            ui_nodes.append(ui)
        lanes = self._reroute_long_links(ui_nodes, links, col_of, col_x, col_w, max(columns.values()))
        col_x = self._widen_gaps(ui_nodes, links, col_of, col_x, col_w)
        # zoomed so that the whole graph fits a 1600x1000 view
        width, height = col_x[-1] + col_w[-1] + 40, max(columns.values()) + 40 * lanes
        # (not below 0.62: under 0.6 the frontend stops drawing titles and widgets)
        scale = round(max(0.62, min(0.8, 1600 / width, 1000 / height)), 2)
        models = [d.entry() for d in dict.fromkeys(self.downloads)]
        return {"last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": scale, "offset": [0, 0]}}, "version": 0.4,
                **({"models": models} if models else {})}

    @staticmethod
    def _reroute_long_links(ui_nodes: list, links: list, col_of: dict, col_x: list, col_w: list, bottom: int) -> int:
        """Links that skip a column run through the frontend's Reroute nodes along a lane below the
        graph (one lane per output), so that no link passes behind a node: from the output down to
        a reroute at the left of the next column, along the lane, and up to each input from a
        reroute at the right of the column before it. Returns the number of lanes. (Reroutes are
        the page's alone: the API format joins the nodes directly.)"""
        by_id = {n["id"]: n for n in ui_nodes}
        far: dict[tuple, list] = {}
        for link in links:
            if col_of[link[3]] - col_of[link[1]] >= 2:
                far.setdefault((link[1], link[2]), []).append(link)
        next_id = max(by_id) + 1

        def reroute(x: float, y: float, kind: str, col: int) -> dict:
            nonlocal next_id
            col_of[next_id] = col
            node = {"id": next_id, "type": "Reroute", "pos": [x, y], "size": [75, 26], "flags": {}, "order": len(ui_nodes), "mode": 0,
                    "inputs": [{"name": "", "type": "*", "link": None}], "outputs": [{"name": "", "type": kind, "links": [], "slot_index": 0}],
                    "properties": {"showOutputText": False, "horizontal": False}}
            next_id += 1
            ui_nodes.append(node)
            by_id[node["id"]] = node
            return node

        def join(src: dict, src_slot: int, dst: dict, link: list | None, kind: str) -> None:
            if link is None:
                link = [len(links) + 1, 0, 0, dst["id"], 0, kind]
                links.append(link)
            else:  # an existing link now leaves from a reroute
                by_id[link[1]]["outputs"][link[2]]["links"].remove(link[0])
            link[1], link[2] = src["id"], src_slot
            src["outputs"][src_slot]["links"].append(link[0])
            if dst["type"] == "Reroute":
                dst["inputs"][0]["link"] = link[0]

        for lane, ((src, slot), group) in enumerate(far.items()):
            y, kind, start = bottom + 40 * lane, group[0][5], col_of[src]
            entry = reroute(col_x[start + 1], y, kind, start + 1)
            join(by_id[src], slot, entry, None, kind)
            last = entry
            for c in sorted({col_of[link[3]] for link in group}):  # a reroute at the right of the column before each target
                exit_ = reroute(col_x[c - 1] + col_w[c - 1] - 75, y, kind, c - 1)
                join(last, 0, exit_, None, kind)
                for link in (lk for lk in group if col_of[lk[3]] == c):
                    join(exit_, 0, by_id[link[3]], link, kind)
                last = exit_
        return len(far)

    @staticmethod
    def _widen_gaps(ui_nodes: list, links: list, col_of: dict, col_x: list, col_w: list) -> list:
        """Each gap between columns as wide as the links across it bulge: the frontend draws a link
        as a curve that leaves an output, and enters an input, sideways by a quarter of its length,
        so a tall one would pass behind the next column's nodes in a 60 px gap. Moves the nodes to
        the new columns; returns their x."""
        by_id = {n["id"]: n for n in ui_nodes}
        gaps = [60.0] * len(col_x)
        for _, src, s_slot, dst, d_slot, _ in links:
            a, b = by_id[src], by_id[dst]
            if col_of[src] != col_of[dst]:
                length = abs((b["pos"][1] + 20 * d_slot) - (a["pos"][1] + 20 * s_slot)) + 60
                gaps[col_of[src]] = max(gaps[col_of[src]], 0.09 * length + 30)  # (the curve's overshoot: 0.075 of its length)
        new_x = [40 + sum(col_w[:k]) + sum(gaps[:k]) for k in range(len(col_x))]
        for n in ui_nodes:
            n["pos"][0] = n["pos"][0] - col_x[col_of[n["id"]]] + new_x[col_of[n["id"]]]
        return new_x

    # -- API format ----------------------------------------------------------------------------
    def api(self) -> dict:
        out = {}
        for node in self.items:
            if node["type"] == "Note":
                continue
            sig = node_signature(node["type"], self.defs)
            inputs = {}
            for name, _, _ in sig["inputs"]:
                if name not in node["values"]:
                    continue
                v = node["values"][name]
                inputs[name] = [str(v[0]["id"]), v[1]] if isinstance(v, tuple) else v
            out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node["title"] or node["type"]}}
        return out


# ----------------------------------------------------------------------------------------------
# the workflows


def release(family: str, preset: str) -> dict:
    """One release's facts as its family states them: steps, cfg, sampler, frames, height, width,
    fps, frame_rule (:func:`vdit_core.families.release_facts`)."""
    from vdit_core import families

    f = families.get(family)
    return families.release_facts(f, f.presets[preset])


def folder_facts(folder: Path) -> dict:
    """The same facts of a model folder: what its pipeline runs with by default (its family's
    defaults and what the folder says; only the transformer is loaded, for its config)."""
    import torch

    from vdit_core import families

    family = families.for_folder(folder)
    config = family.load_transformer(Path(folder) / "transformer", torch.float32, "cpu").config
    return families.release_facts(family, config, folder)


def native_loaders(g: Graph, source: Files | str, dtype: str, family: str = "auto") -> tuple[dict, dict, dict]:
    """The three loaders for ComfyUI's own nodes (MODEL, the text encoder, VAE) of a release's
    files, which go into the workflow's "models" list, or of the bundled demo."""
    if isinstance(source, Files):
        g.downloads += source.downloads
        model, text, vae = source.model[0].choice, source.text_encoder.choice, source.vae.choice
    else:
        model = text = vae = source
    m = g.add("VDITLoadModel", model=model, weight_dtype=dtype, attention="auto", compile=False)
    te = g.add("VDITTextEncoderLoader", text_encoder=text, dtype=dtype, max_length=0, family=family)
    v = g.add("VDITLoadVAE", vae=vae, dtype=dtype, variant="auto")
    return m, te, v


def native(pack, model: Files | str, note: str, facts: dict, prompt: str, dtype="default", negative="", prefix="vdit/t2v", steps: int | None = None,
           size: dict | None = None, family: str = "auto", image: bool = False, lora: str | None = None, sampler: str | None = None) -> Graph:
    """A text-to-video (``image``: text-to-image) graph on ComfyUI's own sampling and saving nodes:
    KSampler with the release's sampler, steps and CFG, VAE Decode, then Create Video + Save Video
    (or Save Image)."""
    g = Graph(pack)
    g.note(note)
    m, te, vae = native_loaders(g, model, dtype, family)
    if lora:
        m = g.add("LoraLoaderModelOnly", model=(m, 0), lora_name=lora, strength_model=1.0)
    negative_title = "Negative prompt (empty: the learned null)" if facts.get("null_negative") else "Negative prompt"
    pos = g.add("VDITPromptEncode", "Positive prompt", text_encoder=(te, 0), text=prompt)
    neg = g.add("VDITPromptEncode", negative_title, text_encoder=(te, 0), text=negative)
    size = size or {"width": facts["width"], "height": facts["height"], "frames": facts["frames"], "resolution": "custom", "duration": "custom"}
    lat = g.add("VDITEmptyLatentVideo", model=(m, 0), batch_size=1, **size)
    sample_and_save(g, m, vae, (pos, 0), (neg, 0), (lat, 0), facts, prefix, steps=steps, image=image, sampler=sampler)
    return g


def sample_and_save(g: Graph, m: dict, vae: dict, pos: tuple, neg: tuple, latent: tuple, facts: dict, prefix: str, steps: int | None = None,
                    denoise: float = 1.0, image: bool = False, sampler: str | None = None) -> None:
    """The release's sampler, steps and CFG (KSampler, or for CogVideoX's DPM with dynamic CFG,
    SamplerCustomAdvanced), VAE Decode, then Create Video + Save Video (or Save Image)."""
    steps, sampler = steps or facts["steps"], sampler or facts["sampler"]
    if sampler == "cogvideox_dpm":
        noise = g.add("RandomNoise", noise_seed=42)
        guider = g.add("VDITDynamicCFGGuider", model=(m, 0), positive=pos, negative=neg, cfg=float(facts["cfg"]))
        sampler = g.add("VDITSamplerSelect", sampler_name="cogvideox_dpm")
        sigmas = g.add("BasicScheduler", model=(m, 0), scheduler="simple", steps=steps, denoise=denoise)
        s = g.add("SamplerCustomAdvanced", noise=(noise, 0), guider=(guider, 0), sampler=(sampler, 0), sigmas=(sigmas, 0), latent_image=latent)
    else:
        s = g.add("KSampler", model=(m, 0), seed=42, steps=steps, cfg=float(facts["cfg"]), sampler_name=KSAMPLER[sampler],
                  scheduler="simple", positive=pos, negative=neg, latent_image=latent, denoise=denoise)
    d = g.add("VAEDecode", samples=(s, 0), vae=(vae, 0))
    if image:
        g.add("SaveImage", images=(d, 0), filename_prefix=prefix)
    else:
        v = g.add("CreateVideo", images=(d, 0), fps=float(facts["fps"]))
        g.add("SaveVideo", video=(v, 0), filename_prefix=prefix, format="mp4", codec="h264")


def cogvideox_note(release: str, folder: str) -> str:
    return files_note(RELEASE_FILES[release], folder) + " (the diffusers format: model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/)."


def image_to_video(pack) -> Graph:
    r = release("cogvideox", "cogvideox-5b-i2v")
    g = Graph(pack)
    g.note(cogvideox_note("cogvideox-5b-i2v", "CogVideoX-5b-I2V") +
           f" Load the first frame: VDIT Image To Video resizes it to {r['width']}x{r['height']} (centre crop). The release's sampler: "
           "CogVideoX's DPM with dynamic CFG (SamplerCustomAdvanced).")
    m, te, vae = native_loaders(g, RELEASE_FILES["cogvideox-5b-i2v"], "bf16")
    img = g.add("LoadImage", image="first_frame.png")
    pos = g.add("VDITPromptEncode", "Positive prompt", text_encoder=(te, 0), text="the scene slowly comes to life, gentle camera motion")
    neg = g.add("VDITPromptEncode", "Negative prompt", text_encoder=(te, 0), text="")
    i2v = g.add("VDITImageToVideo", model=(m, 0), positive=(pos, 0), negative=(neg, 0), vae=(vae, 0), start_image=(img, 0),
                width=r["width"], height=r["height"], frames=r["frames"], batch_size=1)
    sample_and_save(g, m, vae, (i2v, 0), (i2v, 1), (i2v, 2), r, "vdit/i2v", sampler="cogvideox_dpm")
    return g


def video_to_video(pack) -> Graph:
    r = release("cogvideox", "cogvideox-5b")
    g = Graph(pack)
    g.note(cogvideox_note("cogvideox-5b", "CogVideoX-5b") +
           f" Load a video ({r['width']}x{r['height']} works best); its first {r['frames']} frames are re-generated following the prompt; "
           "lower denoise keeps more of the input.")
    m, te, vae = native_loaders(g, RELEASE_FILES["cogvideox-5b"], "bf16")
    vid = g.add("LoadVideo", file="input.mp4")
    comp = g.add("GetVideoComponents", video=(vid, 0))
    frames = g.add("ImageFromBatch", f"First {r['frames']} frames", image=(comp, 0), batch_index=0, length=r["frames"])
    enc = g.add("VAEEncode", pixels=(frames, 0), vae=(vae, 0))
    pos = g.add("VDITPromptEncode", "Positive prompt", text_encoder=(te, 0), text="the same scene as a watercolour painting")
    neg = g.add("VDITPromptEncode", "Negative prompt", text_encoder=(te, 0), text="")
    sample_and_save(g, m, vae, (pos, 0), (neg, 0), (enc, 0), r, "vdit/v2v", denoise=0.7)
    return g


HUNYUAN_NOTE = (
    "{files} (Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers, or v1.1: model_index.json, transformer/, vae/, text_encoder/ + tokenizer/ "
    "(the bilingual CLIP), text_encoder_2/ + tokenizer_2/ (mT5), scheduler/). The one checkpoint holds the transformer, both text "
    "encoders and the VAE; each loader takes its part. A transformer file from Tencent's own "
    "release (t2i/model/pytorch_model_ema.pt) also loads in VDIT Model Loader from models/diffusion_models. "
    "Trained sizes: {sizes}; frames = {frame_rule} (an image). Prompts in English or Chinese. {steps} steps here, "
    "for speed (diffusers' HunyuanDiT pipeline's default); the release's own inference uses {release_steps}."
)
# Deliberately fewer steps than the release's inference (the family's default, which the CLI and
# the library use): half the time, as diffusers' HunyuanDiT pipeline runs by default; the Note says so.
HUNYUAN_WORKFLOW_STEPS = 50


def hunyuandit_note(r: dict, extra: str = "") -> str:
    from vdit_core import families

    sizes = ", ".join(f"{w}x{h}" for w, h in families.get("hunyuandit").resolutions)
    return HUNYUAN_NOTE.format(files=files_note(RELEASE_FILES["hunyuandit-v1.2"], "HunyuanDiT-v1.2-Diffusers"), sizes=sizes, frame_rule=r["frame_rule"], steps=HUNYUAN_WORKFLOW_STEPS, release_steps=r["steps"]) + extra


def hunyuandit_text_to_image(pack) -> Graph:
    r = release("hunyuandit", "hunyuandit-v1.2")
    size = {"width": r["width"], "height": r["height"], "frames": r["frames"], "resolution": f"HunyuanDiT {r['width']}x{r['height']}", "duration": "custom"}
    return native(pack, RELEASE_FILES["hunyuandit-v1.2"], hunyuandit_note(r), r, "a cute cat sitting on a windowsill, watercolour",
                  negative="blurry, low quality, deformed", prefix="vdit/hunyuandit", steps=HUNYUAN_WORKFLOW_STEPS, size=size, image=True)


def hunyuandit_image_to_image(pack) -> Graph:
    r = release("hunyuandit", "hunyuandit-v1.2")
    g = Graph(pack)
    g.note(hunyuandit_note(r, " Load the image to vary (VAE Encode centre-crops it to multiples of 16); lower denoise keeps more of it."))
    m, te, vae = native_loaders(g, RELEASE_FILES["hunyuandit-v1.2"], "default")
    pos = g.add("VDITPromptEncode", "Positive prompt", text_encoder=(te, 0), text="a cute cat sitting on a windowsill, watercolour")
    neg = g.add("VDITPromptEncode", "Negative prompt", text_encoder=(te, 0), text="blurry, low quality, deformed")
    img = g.add("LoadImage", image="input.png")
    enc = g.add("VAEEncode", "Encode the image", pixels=(img, 0), vae=(vae, 0))
    sample_and_save(g, m, vae, (pos, 0), (neg, 0), (enc, 0), r, "vdit/hunyuandit_i2i", steps=HUNYUAN_WORKFLOW_STEPS, denoise=0.6, image=True)
    return g


OPENSORA_NOTE = (
    "{files}, assembled from the releases: transformer/ (hpcai-tech/OpenSora-STDiT-v3: config.json, model.safetensors), "
    "vae/ (hpcai-tech/OpenSora-VAE-v1.2: config.json, model.safetensors), text_encoder/ + tokenizer/ (DeepFloyd/t5-v1_1-xxl); "
    "no model_index.json is needed. The VAE file holds the spatial SDXL VAE too; the text encoder loader's family is set to opensora. Sizes: the Empty Latent's Open-Sora presets; frames {frame_rule} (2s = {two_seconds}). "
    "{steps} steps, CFG {cfg:g}; ' aesthetic score: {aesthetic_score}.' is appended to the prompt (write your own score to change it); "
    "the empty negative is the model's learned null caption."
)
OPENSORA_SIZE, OPENSORA_DURATION = "360p 16:9", "2s"  # the workflows' choice among the release's names


def opensora_note(r: dict, extra: str = "") -> str:
    from vdit_core import families

    family = families.get("opensora")
    return OPENSORA_NOTE.format(files=files_note(RELEASE_FILES["opensora-v1.2"], "OpenSora-v1.2"), frame_rule=r["frame_rule"], two_seconds=family.durations["2s"], steps=r["steps"], cfg=r["cfg"],
                                aesthetic_score=families.opensora.AESTHETIC_SCORE) + extra


OPENSORA_PROMPT = "a drone shot over a misty pine forest at sunrise, soft light, slow forward motion"


def opensora_text_to_video(pack) -> Graph:
    from vdit_core import families

    r = release("opensora", "opensora-v1.2")
    family = families.get("opensora")
    (width, height), frames = family.named_resolutions[OPENSORA_SIZE], family.durations[OPENSORA_DURATION]
    size = {"width": width, "height": height, "frames": frames, "resolution": f"{family.label} {OPENSORA_SIZE} {width}x{height}",
            "duration": f"{family.label} {OPENSORA_DURATION} ({frames} frames)"}
    return native(pack, RELEASE_FILES["opensora-v1.2"], opensora_note(r), {**r, "null_negative": True}, OPENSORA_PROMPT, dtype="bf16",
                  prefix="vdit/opensora", size=size, family="opensora")


def opensora_image_to_video(pack) -> Graph:
    from vdit_core import families

    r = release("opensora", "opensora-v1.2")
    family = families.get("opensora")
    (width, height), frames = family.named_resolutions[OPENSORA_SIZE], family.durations[OPENSORA_DURATION]
    g = Graph(pack)
    g.note(opensora_note(r, " Image-to-video: load the first frame; VDIT Image To Video resizes it to the video's size (centre crop) "
                            "and holds it as the video's first frames."))
    m, te, vae = native_loaders(g, RELEASE_FILES["opensora-v1.2"], "bf16", family="opensora")
    img = g.add("LoadImage", image="first_frame.png")
    pos = g.add("VDITPromptEncode", "Positive prompt", text_encoder=(te, 0), text=OPENSORA_PROMPT)
    neg = g.add("VDITPromptEncode", "Negative prompt (empty: the learned null)", text_encoder=(te, 0), text="")
    i2v = g.add("VDITImageToVideo", model=(m, 0), positive=(pos, 0), negative=(neg, 0), vae=(vae, 0), start_image=(img, 0),
                width=width, height=height, frames=frames, batch_size=1)
    sample_and_save(g, m, vae, (i2v, 0), (i2v, 1), (i2v, 2), r, "vdit/opensora_i2v")
    return g


# the LoRA workflow's placeholder: the user's own LoRA, which the missing value itself says
OWN_LORA = "your_own_lora_trained_with_vdit_core.train.safetensors"


def all_workflows(pack) -> dict[str, Graph]:
    from vdit_core.demo import demo_model_path

    demo, b2, b5 = folder_facts(demo_model_path()), release("cogvideox", "cogvideox-2b"), release("cogvideox", "cogvideox-5b")
    return {
        "vdit demo - text to video (no downloads)": native(
            pack, "vdit-demo (bundled)",
            f"Runs with no downloads: the tiny demo model bundled with vdit ({demo['width']}x{demo['height']}, {demo['frames']} frames of moving shapes). "
            "Try prompts like 'a blue square moving up': 3 shapes (circle, square, triangle), 6 colours (red, green, "
            "blue, yellow, white, purple), 4 directions (left, right, up, down).",
            demo, "a blue square moving up", prefix="vdit/demo"),
        "CogVideoX 2B - text to video": native(
            pack, RELEASE_FILES["cogvideox-2b"], cogvideox_note("cogvideox-2b", "CogVideoX-2b") +
            f" The 2B model runs in fp16 with {b2['sampler'].upper()}, {b2['steps']} steps, CFG {b2['cfg']:g}, {b2['frames']} frames at "
            f"{b2['width']}x{b2['height']}, {b2['fps']:g} fps.",
            b2, "a panda playing a guitar in a bamboo forest, soft morning light", dtype="fp16"),
        "CogVideoX 5B - text to video": native(
            pack, RELEASE_FILES["cogvideox-5b"], cogvideox_note("cogvideox-5b", "CogVideoX-5b") +
            f" The 5B model runs in bf16 with its release's sampler: CogVideoX's DPM with dynamic CFG, {b5['steps']} steps, CFG {b5['cfg']:g} "
            "(SamplerCustomAdvanced with VDIT Sampler Select and VDIT Dynamic CFG Guider).",
            b5, "a golden retriever running through shallow waves at sunset", dtype="bf16", sampler="cogvideox_dpm"),
        "CogVideoX 5B - text to video with a LoRA": native(
            pack, RELEASE_FILES["cogvideox-5b"], cogvideox_note("cogvideox-5b", "CogVideoX-5b") +
            f" The LoRA is YOUR OWN, so no dialog offers it ({OWN_LORA} stands for it): train one with python -m vdit_core.train "
            "--model models/vdit/CogVideoX-5b --data <clips> --output my_lora --lora-rank 64 (the trainer reads the diffusers folder), "
            "or take a diffusers/PEFT or kohya CogVideoX-5B LoRA; put the .safetensors file into models/loras and pick it in Load LoRA; "
            "chain several to stack LoRAs.",
            b5, "a golden retriever running through shallow waves at sunset", dtype="bf16", lora=OWN_LORA, sampler="cogvideox_dpm",
            prefix="vdit/lora"),
        "CogVideoX 5B - image to video": image_to_video(pack),
        "CogVideoX 5B - video to video": video_to_video(pack),
        "HunyuanDiT 1.2 - text to image": hunyuandit_text_to_image(pack),
        "HunyuanDiT 1.2 - image to image": hunyuandit_image_to_image(pack),
        "Open-Sora 1.2 - text to video": opensora_text_to_video(pack),
        "Open-Sora 1.2 - image to video": opensora_image_to_video(pack),
    }


def demo_thumbnail(graph: Graph, out: Path) -> None:
    """The Templates menu's picture of the demo workflow: its own output (the bundled model, the
    workflow's prompt, size, steps, cfg and seed), four frames in a square, 2x nearest."""
    import torch
    from PIL import Image

    from vdit_core import load_pipeline
    from vdit_core.demo import demo_model_path

    v = {n["type"] + ("." + n["title"] if n["title"] else ""): n["values"] for n in graph.items}
    lat, smp = v["VDITEmptyLatentVideo"], v["KSampler"]
    pipe = load_pipeline(demo_model_path(), device="cpu")
    frames = pipe(prompt=v["VDITPromptEncode.Positive prompt"]["text"], num_frames=lat["frames"], height=lat["height"], width=lat["width"],
                  steps=smp["steps"], cfg=smp["cfg"], seed=smp["seed"], progress=False)
    n = len(frames) - 1
    a, b, c, d = (frames[round(n * k / 3)] for k in range(4))
    grid = torch.cat([torch.cat([a, b], dim=1), torch.cat([c, d], dim=1)], dim=0)  # four moments, reading order
    img = Image.fromarray((grid * 255).round().byte().numpy())
    img.resize((img.width * 2, img.height * 2), Image.NEAREST).save(out, quality=90)


# a node's colour in a template's picture, by what it does (the first word its type holds)
ROLE_COLOURS = (("LoadImage", (60, 140, 150)), ("LoadVideo", (60, 140, 150)), ("GetVideo", (60, 140, 150)), ("FromBatch", (60, 140, 150)),
                ("Load", (120, 86, 170)), ("Lora", (120, 86, 170)), ("Prompt", (180, 150, 60)), ("EmptyLatent", (170, 90, 140)),
                ("ImageToVideo", (170, 90, 140)), ("VAEEncode", (170, 90, 140)), ("Sampler", (70, 150, 90)), ("Guider", (70, 150, 90)),
                ("Scheduler", (70, 150, 90)), ("Noise", (70, 150, 90)), ("VAEDecode", (170, 80, 80)), ("Save", (60, 110, 170)),
                ("CreateVideo", (60, 110, 170)), ("Note", (110, 90, 60)))


def graph_thumbnail(name: str, ui: dict, titles: dict, out: Path, size: tuple[int, int] = (512, 384)) -> None:
    """The Templates menu's picture of a workflow whose model is not bundled (so no frame of it can
    be rendered here): the family and task in words, over the workflow's own graph as the UI draws
    it (its nodes, coloured by role and named, and its links), and the files it downloads."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, (24, 26, 32))
    d = ImageDraw.Draw(img)
    family, _, task = name.partition(" - ")
    d.text((16, 12), family, fill=(240, 240, 240), font=ImageFont.load_default(size=30))
    d.text((16, 50), task, fill=(190, 200, 215), font=ImageFont.load_default(size=22))
    files = dict.fromkeys(re.sub(r"-\d{5}-of-\d{5}$", "", m["name"].removesuffix(".safetensors")) for m in ui.get("models", []))
    d.text((16, size[1] - 24), "downloads: " + ", ".join(files), fill=(140, 150, 165), font=ImageFont.load_default(size=12))
    nodes = ui["nodes"]
    x0, y0 = min(n["pos"][0] for n in nodes), min(n["pos"][1] for n in nodes)
    x1, y1 = max(n["pos"][0] + n["size"][0] for n in nodes), max(n["pos"][1] + n["size"][1] for n in nodes)
    box = (16, 88, size[0] - 16, size[1] - 32)  # where the graph goes
    k = min((box[2] - box[0]) / (x1 - x0), (box[3] - box[1]) / (y1 - y0))

    def at(x, y):
        return box[0] + (x - x0) * k, box[1] + (y - y0) * k

    by_id = {n["id"]: n for n in nodes}
    for _, src, slot, dst, dslot, _ in ui["links"]:
        a, b = by_id[src], by_id[dst]
        d.line([at(a["pos"][0] + a["size"][0], a["pos"][1] + 30 + 22 * slot), at(b["pos"][0], b["pos"][1] + 30 + 22 * dslot)],
               fill=(150, 160, 175), width=2)
    small = ImageFont.load_default(size=9)
    for n in nodes:
        colour = next((c for word, c in ROLE_COLOURS if word.lower() in n["type"].lower()), (90, 95, 105))
        (ax, ay), (bx, by) = at(*n["pos"]), at(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        d.rounded_rectangle([ax, ay, bx, by], radius=4, fill=colour, outline=(230, 230, 230))
        label = (n.get("title") or titles.get(n["type"], n["type"])).removeprefix("VDIT ")
        while label and d.textlength(label, font=small) > bx - ax - 6:
            label = label[:-1]
        d.text((ax + 3, ay + 2), label, fill=(250, 250, 250), font=small)
    img.save(out, quality=90)


def main() -> None:
    pack = load_pack()
    (HERE / "api").mkdir(exist_ok=True)
    graphs = all_workflows(pack)
    for name, graph in graphs.items():
        (HERE / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1) + "\n")
        (HERE / "api" / f"{name}.json").write_text(json.dumps(graph.api(), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")
    demo = next(name for name in graphs if name.startswith("vdit demo"))
    demo_thumbnail(graphs[demo], HERE / f"{demo}.jpg")
    print(f"wrote workflows/{demo}.jpg: the demo's own frames")
    from PIL import Image

    Image.open(HERE / f"{demo}.jpg").convert("RGB").resize((400, 400), Image.NEAREST).save(ROOT / "web" / "icon.png")
    print("wrote web/icon.png (the registry's icon): the same frames")
    for name, graph in graphs.items():
        if name != demo:  # the other models' weights are not here to render frames of
            graph_thumbnail(name, graph.ui(), graph.titles, HERE / f"{name}.jpg")
            print(f"wrote workflows/{name}.jpg: its graph")


if __name__ == "__main__":
    main()
