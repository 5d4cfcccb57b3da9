"""The registered families' sizes, durations and VAE presets as the nodes and the CLI offer them,
reading those choices back, and the releases' facts as tooltips and --help quote them."""

from __future__ import annotations

from pathlib import Path

from .base import Family
from .registry import FAMILIES


def resolution_choices() -> list[str]:
    """Every family's trained sizes, as the Empty Latent node offers them: "HunyuanDiT 1024x768",
    "Open-Sora 240p 16:9 424x240" (the size last)."""
    out = []
    for f in FAMILIES.values():
        named = {wh: name for name, wh in f.named_resolutions.items()}
        out += [f"{f.label} {named[(w, h)]} {w}x{h}" if (w, h) in named else f"{f.label} {w}x{h}" for w, h in f.resolutions]
    return out


def duration_choices() -> list[str]:
    """Every family's named frame counts, as the Empty Latent node offers them: "Open-Sora 2s (51 frames)"."""
    return [f"{f.label} {name} ({n} frame{'s' if n != 1 else ''})" for f in FAMILIES.values() for name, n in f.durations.items()]


def parse_resolution(text: str) -> tuple[int, int]:
    """(width, height) of ``WxH`` or a release's size name ("240p 16:9"; "240p" alone: its 16:9)."""
    t = text.strip()
    parts = t.lower().split("x")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    names = {n.lower(): wh for f in FAMILIES.values() for n, wh in f.named_resolutions.items()}
    key = t.lower() if t.lower() in names else f"{t.lower()} 16:9"
    if key in names:
        return names[key]
    known = sorted({n for f in FAMILIES.values() for n in f.named_resolutions})
    raise ValueError(f"resolution {text!r}: expected WxH (e.g. 720x480) or a release's size name ({', '.join(known) or 'none'})")


def parse_duration(text: str) -> int:
    """Frames of a release's duration name ("2s": 51) or of a plain number."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    for f in FAMILIES.values():
        if t in f.durations:
            return f.durations[t]
    known = sorted({n for f in FAMILIES.values() for n in f.durations})
    raise ValueError(f"duration {text!r}: expected a frame count or a release's duration ({', '.join(known) or 'none'})")


def vae_variants() -> list[str]:
    """Every family's VAE presets (the VAE loader node's choices)."""
    return [v for f in FAMILIES.values() for v in f.vae_variants]


def release_facts(family: Family, config, folder: Path | None = None) -> dict:
    """One release's facts as users read them, from the family's own methods: ``steps``, ``cfg``,
    ``sampler`` (its sampling defaults; with ``folder``, what that model folder says), ``frames``,
    ``height``, ``width`` (its trained size), ``fps`` (None for an image model), ``frame_rule``,
    ``size_multiple`` (pixels) and ``text_length``."""
    d = family.model_defaults(folder, config)
    frames, height, width = family.default_size(config, d["vae_scale"])
    return {"steps": d["steps"], "cfg": d["cfg"], "sampler": d["sampler"], "frames": frames, "height": height, "width": width,
            "fps": family.fps(config) if frames > 1 else None, "frame_rule": family.frame_rule(config),
            "size_multiple": family.size_multiple(config, d["vae_scale"]), "text_length": family.text_length}


def quote(fact: str) -> str:
    """A :func:`release_facts` entry of every registered family, as tooltips and --help quote it:
    "CogVideoX: 50; HunyuanDiT: 100; Open-Sora: 30". Where a family's releases differ, its most
    common value comes first and the others name their releases ("CogVideoX: 8 (16 for
    cogvideox1.5-5b, cogvideox1.5-5b-i2v)"); families without presets, or without the fact (None, "", 0), are left out."""
    out = []
    for f in FAMILIES.values():
        names: dict[str, list[str]] = {}  # value as written -> the releases that have it
        for name, config in f.presets.items():
            v = release_facts(f, config)[fact]
            if v not in (None, "", 0):
                names.setdefault(f"{v:g}" if isinstance(v, float) else str(v), []).append(name)
        if names:
            (first, _), *rest = sorted(names.items(), key=lambda kv: -len(kv[1]))  # (stable: ties keep the presets' order)
            others = "; ".join(f"{v} for {', '.join(n)}" for v, n in rest)
            out.append(f"{f.label}: {first}" + (f" ({others})" if others else ""))
    return "; ".join(out)
