"""Write the nodes' help pages (``web/docs/<NodeName>.md``), which ComfyUI's node library shows in
its help panel, from the nodes themselves: each input's type, default, range, choices and tooltip
from INPUT_TYPES, the outputs from RETURN_TYPES / RETURN_NAMES / OUTPUT_TOOLTIPS, and the model
families' facts from vdit_core.families. Only the examples are written here.

    python web/build_help.py
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = HERE / "docs"

# what each output type is, for outputs without a tooltip of their own
OUTPUT_WORDS = {
    "MODEL": "a ComfyUI model: KSampler, SamplerCustomAdvanced, the LoRA loaders and model patches take it",
    "VAE": "a ComfyUI VAE: VAE Decode, VAE Decode (Tiled) and VAE Encode take it",
    "CONDITIONING": "ComfyUI conditioning for the sampler's positive or negative input",
    "LATENT": "latents for a sampler, or for decoding",
    "SAMPLER": "a sampler for SamplerCustomAdvanced",
    "GUIDER": "a guider for SamplerCustomAdvanced",
    "IMAGE": "the frames, as an image batch (one image per frame)",
    "VDIT_MODEL": "vdit's own model handle, for VDIT Sampler and VDIT LoRA Apply",
    "VDIT_TEXT_ENCODER": "the text encoder(s), for VDIT Prompt Encode or VDIT Text Encode",
    "VDIT_VAE": "vdit's own VAE handle, for VDIT VAE Encode / Decode",
    "VDIT_CONDITIONING": "vdit's own conditioning, for VDIT Sampler",
}

# a minimal use of each node, in words (the bundled workflows show them all)
EXAMPLES = {
    "VDITLoadModel": "VDIT Load Model -> KSampler's `model` (and VDIT Empty Latent Video's). The bundled workflow "
                     "`vdit demo - text to video (no downloads)` loads the demo model this way.",
    "VDITLoadVAE": "VDIT Load VAE -> VAE Decode's `vae`, after KSampler: the latents become frames.",
    "VDITPromptEncode": "VDIT Text Encoder Loader -> two VDIT Prompt Encode nodes (the prompt and the negative prompt) -> "
                        "KSampler's `positive` and `negative`.",
    "VDITEmptyLatentVideo": "VDIT Load Model -> VDIT Empty Latent Video (the size and frame count) -> KSampler's `latent_image`. "
                            "For CogVideoX 1.5, `trim_latent` -> ComfyUI's TrimVideoLatent between KSampler and VAE Decode.",
    "VDITImageToVideo": "Load Image -> VDIT Image To Video (with the model, both prompts and the VAE) -> its positive, negative "
                        "and latent into KSampler. See the bundled `CogVideoX 5B - image to video` workflow.",
    "VDITSamplerSelect": "VDIT Sampler Select (`cogvideox_dpm`) -> SamplerCustomAdvanced's `sampler`, with BasicScheduler's sigmas, "
                         "as the bundled CogVideoX 5B workflows sample.",
    "VDITDynamicCFGGuider": "VDIT Load Model and both prompts -> VDIT Dynamic CFG Guider -> SamplerCustomAdvanced's `guider`.",
    "VDITStepCache": "VDIT Load Model -> VDIT Step Cache (threshold 0.1) -> KSampler's `model`: fewer transformer calls, "
                     "the skipped count in the log.",
    "VDITModelLoader": "VDIT Model Loader -> VDIT Sampler's `model` (the node set of saved vdit workflows; new workflows use "
                       "VDIT Load Model and KSampler).",
    "VDITTextEncoderLoader": "VDIT Text Encoder Loader -> VDIT Prompt Encode (or VDIT Text Encode). For Open-Sora with a lone "
                             "T5 file, set `family` to opensora.",
    "VDITVAELoader": "VDIT VAE Loader -> VDIT VAE Decode's `vae` (saved vdit workflows; new ones use VDIT Load VAE).",
    "VDITTextEncode": "VDIT Text Encoder Loader -> VDIT Text Encode -> VDIT Sampler's `positive` (saved vdit workflows).",
    "VDITEmptyLatent": "VDIT Model Loader -> VDIT Empty Latent -> VDIT Sampler's `latent` (saved vdit workflows).",
    "VDITSampler": "VDIT Model Loader, two VDIT Text Encode nodes and VDIT Empty Latent -> VDIT Sampler -> VDIT VAE Decode "
                   "(saved vdit workflows).",
    "VDITVAEEncode": "Load Image -> VDIT VAE Encode -> VDIT Sampler's `image_latent` (image to video in saved vdit workflows).",
    "VDITVAEDecode": "VDIT Sampler -> VDIT VAE Decode -> VDIT Save Video or any IMAGE node.",
    "VDITLoraApply": "VDIT Model Loader -> VDIT LoRA Apply (chain several) -> VDIT Sampler (saved vdit workflows; with VDIT Load "
                     "Model, ComfyUI's LoraLoaderModelOnly does this).",
    "VDITSaveVideo": "VDIT VAE Decode -> VDIT Save Video (mp4 in ComfyUI's output folder). ComfyUI's Create Video + Save Video "
                     "do the same for any frames.",
}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _kind(kind, opts: dict) -> tuple[str, str]:
    """(type, default and range) of an input as the page states them."""
    if isinstance(kind, list):
        files = any(str(k).endswith((".safetensors", "/")) for k in kind) or kind[:1] == ["vdit-demo (bundled)"]
        if files:
            return "choice: a model file or folder", f"default `{opts.get('default', kind[0] if kind else '')}`"
        shown = ", ".join(f"`{k}`" for k in kind[:12]) + (f" and {len(kind) - 12} more" if len(kind) > 12 else "")
        return "choice", f"default `{opts.get('default', kind[0] if kind else '')}`; one of {shown}"
    if kind in ("INT", "FLOAT"):
        parts = [f"default {opts['default']}"] if "default" in opts else []
        if "min" in opts or "max" in opts:
            parts.append(f"{opts.get('min', '')} to {opts.get('max', '')}")
        if opts.get("step") not in (None, 1):
            parts.append(f"step {opts['step']}")
        return kind.lower(), ", ".join(parts)
    if kind in ("STRING", "BOOLEAN"):
        return kind.lower(), f"default `{opts['default']}`" if "default" in opts else ""
    return f"`{kind}`, a connection", ""


def families_section(node_type: str) -> str:
    """The model families' facts a node's inputs depend on (from vdit_core.families)."""
    from vdit_core import families

    if node_type not in ("VDITLoadModel", "VDITModelLoader", "VDITEmptyLatentVideo", "VDITEmptyLatent", "VDITImageToVideo", "VDITSampler"):
        return ""
    rows = []
    for family in families.FAMILIES.values():
        for name, config in family.presets.items():
            r = families.release_facts(family, config)
            fps = f"{r['fps']:g} fps" if r["fps"] else "no fps"
            frames = "1 frame (an image)" if r["frame_rule"] == "1" else f"{r['frame_rule']} frames (trained {r['frames']})"
            rows.append(f"- **{family.label}** `{name}`: {frames}, {r['width']}x{r['height']} "
                        f"(multiples of {r['size_multiple']}), {fps}; "
                        f"{r['steps']} steps, CFG {r['cfg']:g}, {r['sampler']}")
    return "## The model families\n\nWhat each release was trained and is sampled with (from vdit's model families):\n\n" + "\n".join(rows) + "\n"


def page(node_type: str, pack) -> str:
    cls = pack.NODE_CLASS_MAPPINGS[node_type]
    title = pack.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type)
    out = [f"# {title}", "", cls.DESCRIPTION, ""]
    replaced = importlib.import_module(f"{pack.__name__}.nodes").REPLACED_BY.get(node_type)
    if replaced:
        out += [f"**Deprecated**: kept so that saved workflows load and run as before; new workflows use {replaced}.", ""]
    spec = cls.INPUT_TYPES()
    # (lists, not tables: the help panel is narrow)
    rows = []
    for section in ("required", "optional"):
        for name, value in spec.get(section, {}).items():
            kind, opts = value[0], (value[1] if len(value) > 1 else {})
            what, values = _kind(kind, opts)
            about = "; ".join(x for x in (what + (", optional" if section == "optional" else ""), values) if x)
            rows.append(f"- **`{name}`** ({about}): {_cell(opts.get('tooltip', ''))}")
    if rows:
        out += ["## Inputs", "", *rows, ""]
    names = getattr(cls, "RETURN_NAMES", None) or [t.lower() for t in cls.RETURN_TYPES]
    tips = getattr(cls, "OUTPUT_TOOLTIPS", None) or [OUTPUT_WORDS.get(t, "") for t in cls.RETURN_TYPES]
    if cls.RETURN_TYPES:
        out += ["## Outputs", ""]
        out += [f"- **`{n}`** (`{t}`): {_cell(tip)}" for n, t, tip in zip(names, cls.RETURN_TYPES, tips)] + [""]
    else:
        out += ["## Outputs", "", "None: it saves its result (an output node).", ""]
    facts = families_section(node_type)
    if facts:
        out += [facts]
    out += ["## Example", "", EXAMPLES[node_type], ""]
    return "\n".join(out)


def pages(pack) -> dict[str, str]:
    """Every node's help page by file name."""
    return {f"{node_type}.md": page(node_type, pack) for node_type in pack.NODE_CLASS_MAPPINGS}


def main() -> None:
    sys.path.insert(0, str(ROOT / "workflows"))
    from build_workflows import load_pack  # (the scripts' one way to import the pack)

    pack = load_pack()
    DOCS.mkdir(exist_ok=True)
    for name, text in pages(pack).items():
        (DOCS / name).write_text(text)
        print(f"wrote web/docs/{name}")


if __name__ == "__main__":
    main()
