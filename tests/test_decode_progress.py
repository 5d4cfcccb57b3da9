"""Decoding reports its progress chunk by chunk, and a cancel raised there stops it within one
chunk: with real models a decode takes minutes, and ComfyUI's cancel used to wait for its end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_package import load_pack
from vdit_core.demo import demo_model_path
from vdit_core.vae import cogvideox_vae, kl2d, opensora_vae
from vdit_core.vae.common import Tiling

FIXTURES = Path(__file__).parent / "fixtures"


def _vae(name: str):
    """(a VAE, its latent frames and chunk size giving several chunks, a batch size)."""
    torch.manual_seed(0)
    if name == "cogvideox":
        return cogvideox_vae.load_vae(demo_model_path() / "vae"), 3, 1, 1
    if name == "opensora":  # its chunk is a micro chunk of 5 latent frames (17 frames)
        return opensora_vae.load_vae(FIXTURES / "opensora" / "vae"), 10, 4, 1
    config = kl2d.KL2DConfig(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4)
    return kl2d.KL2DVAE(config).eval(), 3, 2, 2


@pytest.mark.parametrize("name", ["cogvideox", "kl2d", "opensora"])
@torch.no_grad()
def test_decode_reports_each_chunk_and_gives_the_same_pixels(name):
    vae, t, chunk, batch = _vae(name)
    s = vae.spatial_compression
    z = torch.randn(batch, vae.latent_channels, t, 4, 6, generator=torch.Generator().manual_seed(1))
    decode_tile = vae._decode_chunked
    tiles = []  # one call of the VAE's own chunk loop per spatial tile
    vae._decode_chunked = lambda *a, **k: tiles.append(1) or decode_tile(*a, **k)
    for tiling in (None, Tiling(2 * s, 4 * s, 0.25, 0.25)):  # untiled; tiles of 2 x 4 latents
        calls = []
        out = vae.decode(z, chunk_frames=chunk, tiling=tiling, progress=lambda done, total: calls.append((done, total)))
        n_tiles = len(tiles)
        assert torch.equal(out, vae.decode(z, chunk_frames=chunk, tiling=tiling))
        tiles.clear()
        assert n_tiles == 1 if tiling is None else n_tiles > 1
        total = batch * t * n_tiles  # latent frames of every sample in every tile
        assert len(calls) > n_tiles and {tot for _, tot in calls} == {total}, calls  # several chunks in each tile
        dones = [d for d, _ in calls]
        assert dones == sorted(set(dones)) and dones[-1] == total


class Cancelled(Exception):
    pass


def test_cancel_during_the_vae_decode_node_stops_within_one_chunk(monkeypatch):
    pack = load_pack()
    comfy = __import__(f"{pack.__name__}.nodes.comfy", fromlist=["x"])
    vae = pack.NODE_CLASS_MAPPINGS["VDITVAELoader"]().load("vdit-demo (bundled)", "default", "auto")[0]
    z = {"samples": torch.randn(1, vae.vae.latent_channels, 3, 8, 8)}
    chunks = []
    vae.vae.decoder.register_forward_pre_hook(lambda m, a: chunks.append(a[0].shape[2]))
    checks = []

    def interrupt():
        checks.append(len(chunks))
        if len(checks) == 2:  # the user cancels while the second chunk decodes
            raise Cancelled

    monkeypatch.setattr(comfy, "check_interrupt", interrupt)
    node = pack.NODE_CLASS_MAPPINGS["VDITVAEDecode"]()
    with pytest.raises(Cancelled):
        node.decode(vae, z, 1, "off", 0, 0)
    assert checks == [1, 2]  # checked after each chunk; nothing decoded after the cancel
    full = []
    monkeypatch.setattr(comfy, "check_interrupt", lambda: full.append(1))
    chunks.clear()
    frames = node.decode(vae, z, 1, "off", 0, 0)[0]
    assert frames.shape[0] == vae.vae.pixel_frames(3) and len(chunks) == len(full) == 3  # every chunk checked once
