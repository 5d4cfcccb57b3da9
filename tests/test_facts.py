"""Family facts are stated once, by the family: the node tooltips and defaults, the CLI's --help,
the bundled workflows and the checks all read it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_package import load_pack
from vdit_core import families
from vdit_core.generate import build_parser
from vdit_core.models import cogvideox as cogvideox_model
from vdit_core.models import opensora as opensora_model

NODES = load_pack().NODE_CLASS_MAPPINGS
FIXTURES = Path(__file__).parent / "fixtures"


class Probe(families.Family):
    """A family with facts no real one has, to see them quoted."""

    name = "probe"
    label = "Probe"
    presets = {"probe-1": None}
    text_length = 99

    def sampling_defaults(self, folder, config):
        return {"schedule": None, "sampler": "euler_ancestral", "steps": 7, "cfg": 2.5, "vae_scale": 12}

    def default_size(self, config, spatial_scale):
        return 11, 2 * spatial_scale, 3 * spatial_scale

    def fps(self, config):
        return 13

    def frame_rule(self, config=None):
        return "3k+2"

    def size_multiple(self, config=None, spatial_scale=8):
        return 2 * spatial_scale


@pytest.fixture
def probe():
    family = families.register(Probe())
    yield family
    families.unregister(family.name)


def _tooltips() -> dict[str, str]:
    """node.input -> tooltip of every node input."""
    out = {}
    for node, cls in NODES.items():
        spec = cls.INPUT_TYPES()
        for section in spec.values():
            for name, value in section.items():
                if len(value) > 1 and "tooltip" in value[1]:
                    out[f"{node}.{name}"] = value[1]["tooltip"]
    return out


def _help(monkeypatch) -> dict[str, str]:
    """--option -> its line of ``--help`` as printed (wide enough that nothing wraps)."""
    monkeypatch.setenv("COLUMNS", "100000")
    lines = build_parser().format_help().splitlines()
    return {line.split()[0]: line for line in lines if line.strip().startswith("--")}


def _part(text: str, family) -> str:
    """What ``text`` says of ``family``: from "Label: " to the next family's label ("" if absent)."""
    if f"{family.label}: " not in text:
        return ""
    rest = text.split(f"{family.label}: ", 1)[1]
    ends = [rest.index(f"; {f.label}: ") for f in families.FAMILIES.values() if f"; {f.label}: " in rest]
    return rest[:min(ends, default=len(rest))]


def test_tooltips_and_help_quote_each_familys_own_values(monkeypatch):
    tips, helps = _tooltips(), _help(monkeypatch)
    for family in families.FAMILIES.values():
        for config in family.presets.values():
            d = family.sampling_defaults(None, config)
            frames = family.default_size(config, d["vae_scale"])[0]
            quoted = {  # (where it is quoted, what it says)
                ("VDITSampler.steps", "--steps"): d["steps"],
                ("VDITSampler.cfg", "--cfg"): f"{d['cfg']:g}",
                ("VDITSampler.sampler", "--sampler"): d["sampler"],
                ("VDITEmptyLatent.width", "VDITEmptyLatent.height", "--width", "--height"): family.size_multiple(config, d["vae_scale"]),
                ("VDITEmptyLatent.frames", "VDITVAEEncode.pixels", "--frames"): family.frame_rule(config),
            }
            if frames > 1:
                quoted[("VDITSaveVideo.fps", "--fps")] = family.fps(config)
            if family.text_length:
                quoted[("VDITTextEncoderLoader.max_length",)] = family.text_length
            for places, value in quoted.items():
                for place in places:
                    text = helps[place] if place.startswith("--") else tips[place]
                    assert re.search(rf"(?<![\w.+]){re.escape(str(value))}(?![\w.+])", _part(text, family)), (place, family.name, value, text)
    # how prompts are read and what continues a video, as the families say
    for family in families.FAMILIES.values():
        if family.prompt_note:
            assert f"{family.label}: {family.prompt_note}" in tips["VDITTextEncode.text"]
        if family.extends_videos:
            for text in (tips["VDITSampler.image_latent"], helps["--video"]):
                assert re.search(rf"{family.label} [^;]*last {family.extension_frames} frames", text), text
    aesthetic = families.get("opensora").prompt_defaults["aesthetic_score"]
    assert f"default {aesthetic:g}" in build_parser()._option_string_actions["--aesthetic-score"].help and f"score: {aesthetic:g}." in tips["VDITTextEncode.text"]
    # the size steps differ by family: no line may claim one multiple for all
    for text in (helps["--height"], helps["--width"], tips["VDITEmptyLatent.width"]):
        assert "a multiple of 16" not in text and "Open-Sora: 8" in text


def test_a_registered_familys_facts_appear_where_users_read_them(probe, monkeypatch):
    tips, helps = _tooltips(), _help(monkeypatch)
    for place, quoted in (("VDITSampler.steps", "Probe: 7"), ("VDITSampler.cfg", "Probe: 2.5"), ("VDITSampler.sampler", "Probe: euler_ancestral"),
                          ("VDITEmptyLatent.width", "Probe: 24"), ("VDITEmptyLatent.frames", "Probe: 3k+2"),
                          ("VDITEmptyLatent.frames", "Probe: 11"), ("VDITSaveVideo.fps", "Probe: 13"),
                          ("VDITTextEncoderLoader.max_length", "Probe: 99"), ("VDITVAEEncode.pixels", "Probe: 3k+2")):
        assert quoted in tips[place], (place, tips[place])
    for option, quoted in (("--steps", "Probe: 7"), ("--cfg", "Probe: 2.5"), ("--height", "Probe: 24"), ("--frames", "Probe: 3k+2"),
                           ("--fps", "Probe: 13")):
        assert quoted in helps[option], (option, helps[option])
    # the nodes' starting values stay the first family's first release's (CogVideoX 2B), as its family states them
    first = families.release_facts(families.get("cogvideox"), cogvideox_model.PRESETS["cogvideox-2b"])
    latent, sampler = NODES["VDITEmptyLatent"].INPUT_TYPES()["required"], NODES["VDITSampler"].INPUT_TYPES()["required"]
    assert (latent["frames"][1]["default"], latent["height"][1]["default"], latent["width"][1]["default"]) == (first["frames"], first["height"], first["width"])
    assert (sampler["steps"][1]["default"], sampler["cfg"][1]["default"]) == (first["steps"], first["cfg"])
    assert NODES["VDITSaveVideo"].INPUT_TYPES()["required"]["fps"][1]["default"] == first["fps"]
    assert latent["width"][1]["step"] == 8  # every family's size multiple is a multiple of it (Probe's 24 too)


def test_cogvideox_frames_follow_the_configs_temporal_compression():
    family = families.get("cogvideox")
    config = cogvideox_model.CogVideoXConfig(temporal_compression_ratio=8)
    assert family.frame_rule(config) == "8k+1" and family.frame_rule() == "4k+1"
    assert family.latent_frames(config, 17) == (3, 3)
    assert family.size_problem(17, 480, 720, config) is None
    assert family.size_problem(13, 480, 720, config) == "num_frames=13: CogVideoX takes 8k+1 frames; nearest valid: 9 or 17"
    assert family.size_problem(13, 480, 720) is None  # the releases' rule: 4k+1


def test_opensora_fps_is_the_familys_and_the_network_is_told_it():
    family = families.get("opensora")
    config = opensora_model.STDiT3Config()
    image = family.sample_conditioning(config, (2, 4, 1, 3, 4), 8, fps=30)
    video = family.sample_conditioning(config, (2, 4, 5, 3, 4), 8)
    assert image["fps"].tolist() == [families.opensora.IMAGE_FPS] * 2 and video["fps"].tolist() == [family.fps(config)] * 2
    assert not hasattr(opensora_model, "IMAGE_FPS")  # the release's sampling rule lives with the family
    net = opensora_model.load_transformer(FIXTURES / "opensora" / "transformer")
    x, t, y = torch.randn(1, 4, 2, 4, 6), torch.tensor([500.0]), torch.randn(1, 9, net.config.caption_channels)
    with pytest.raises(ValueError, match="fps: STDiT3 is conditioned on a frame rate"):
        net(x, t, y)
