"""Precomputed VAE posteriors and text embeddings, on disk.

The cache folder is named by a hash of everything that shapes its contents (the VAE and text
encoder weight files, the VAE config, buckets, frame stride, dtype, flips, image conditioning, the
dtype the encoders ran in), so a changed setting never trains on stale latents. Items record their
source file's size and modification time and are recomputed when it changes. When everything is
cached, the VAE and the text encoder are not loaded at all.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..vae.common import frames_to_pixels
from .data import Bucket, Report, Sample, load_clip


def _fingerprint(path: Path) -> list:
    """Identity of a weights folder or file: names, sizes and modification times."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, int(p.stat().st_mtime)] for p in files]


def cache_key(fields: dict) -> str:
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _name(*parts) -> str:
    return hashlib.sha1("\x00".join(map(str, parts)).encode()).hexdigest()[:20]


def _atomic_save(tensors: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


@dataclass
class CacheSpec:
    """Everything that shapes cached tensors."""

    vae_path: Path
    text_path: Path
    vae_config: dict
    sizes: list
    frame_buckets: list
    frame_stride: int
    model_fps: float
    dtype: torch.dtype
    hflip: bool
    image_latents: bool  # image-to-video: also the first frame encoded alone
    encode_dtype: torch.dtype = torch.float32  # the VAE's and text encoder's while encoding

    def key_fields(self) -> dict:
        return {
            "version": 2,  # 2: text conditioning stored as the family's dict
            "vae": _fingerprint(self.vae_path),
            "text": _fingerprint(self.text_path),
            "vae_config": self.vae_config,
            "sizes": self.sizes,
            "frame_buckets": self.frame_buckets,
            "frame_stride": self.frame_stride,
            "model_fps": self.model_fps,
            "dtype": str(self.dtype),
            "hflip": self.hflip,
            "image_latents": self.image_latents,
            "encode_dtype": str(self.encode_dtype),
        }


class LatentCache:
    """A cache folder: ``index.json``, ``latents/*.safetensors``, ``text/*.safetensors``."""

    def __init__(self, root: Path, spec: CacheSpec):
        self.spec = spec
        self.key = cache_key(spec.key_fields())
        self.dir = Path(root) / self.key
        self.index_path = self.dir / "index.json"
        self.index = {"key": spec.key_fields(), "items": {}, "texts": {}}
        if self.index_path.exists():
            self.index = json.loads(self.index_path.read_text())

    # -- building (rank 0, before training) ----------------------------------------------------
    def missing(self, samples: list[Sample], prompts: list[str]) -> tuple[list[Sample], list[str]]:
        todo = []
        for s in {str(s.path): s for s in samples}.values():  # a clip listed under several captions is encoded once
            st = s.path.stat()
            item = self.index["items"].get(str(s.path))
            if item is None or item["size"] != st.st_size or item["mtime"] != int(st.st_mtime) or not (self.dir / item["latent"]).exists():
                todo.append(s)
        texts = [p for p in dict.fromkeys(prompts) if p not in self.index["texts"] or not (self.dir / self.index["texts"][p]).exists()]
        return todo, texts

    def build(
        self,
        samples: list[Sample],
        prompts: list[str],
        report: Report,
        load_vae: Callable[[], object],
        load_text: Callable[[], Callable[[str], dict]],
        progress: Callable = lambda it, **kw: it,
    ) -> None:
        """Encode what is missing; records unusable clips in ``report``. Loads the VAE and the
        text encoder only if something is missing, and frees them afterwards. ``load_text``
        returns a function from a prompt to its conditioning dict (batch 1)."""
        (self.dir / "latents").mkdir(parents=True, exist_ok=True)
        (self.dir / "text").mkdir(parents=True, exist_ok=True)
        failed = {k: v for k, v in self.index.get("failed", {}).items()}
        todo, texts = self.missing(samples, prompts)
        todo = [s for s in todo if str(s.path) not in failed or failed[str(s.path)]["mtime"] != int(s.path.stat().st_mtime)]
        if todo:
            vae = load_vae()
            for s in progress(todo, desc="caching latents"):
                st = s.path.stat()
                try:
                    frames, bucket = load_clip(s, self.spec.sizes, self.spec.frame_buckets, self.spec.model_fps, self.spec.frame_stride)
                except ValueError as e:
                    failed[str(s.path)] = {"reason": str(e).replace(f"{s.path}: ", ""), "mtime": int(st.st_mtime)}
                    continue
                tensors = self._encode(vae, frames)
                name = f"latents/{_name(s.path, st.st_size, int(st.st_mtime))}.safetensors"
                _atomic_save(tensors, self.dir / name)
                self.index["items"][str(s.path)] = {
                    "size": st.st_size, "mtime": int(st.st_mtime), "caption": s.caption,
                    "bucket": [bucket.frames, bucket.height, bucket.width], "latent": name,
                }
            del vae
        if texts:
            encode = load_text()
            for p in progress(texts, desc="caching text embeddings"):
                name = f"text/{_name(p)}.safetensors"
                cond = {k: v[0].to("cpu", self.spec.dtype if v.is_floating_point() else v.dtype) for k, v in encode(p).items()}
                _atomic_save(cond, self.dir / name)
                self.index["texts"][p] = name
            del encode
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.index["failed"] = failed
        for path, info in failed.items():
            if any(str(s.path) == path for s in samples):
                report.skip(path, info["reason"])
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.index, indent=1))
        os.replace(tmp, self.index_path)

    @torch.no_grad()
    def _encode(self, vae, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Posterior moments of the clip (and of its mirror image, and of its first frame alone)."""
        pixels = frames_to_pixels(frames).to(vae.device, vae.dtype)  # [1, 3, F, H, W]
        out = {"moments": vae.encode_moments(pixels)[0]}
        if self.spec.hflip:
            out["moments_flip"] = vae.encode_moments(pixels.flip(-1))[0]
        if self.spec.image_latents:
            out["image_moments"] = vae.encode_moments(pixels[:, :, :1])[0]
            if self.spec.hflip:
                out["image_moments_flip"] = vae.encode_moments(pixels[:, :, :1].flip(-1))[0]
        return {k: v.to("cpu", self.spec.dtype) for k, v in out.items()}

    # -- reading (every rank, during training) -------------------------------------------------
    def items(self, samples: list[Sample]) -> list[dict]:
        """Index entries of the samples that are cached, in dataset order."""
        out = []
        for s in samples:
            item = self.index["items"].get(str(s.path))
            if item is not None:  # latents do not depend on the caption; its embedding is keyed by text
                out.append({**item, "caption": s.caption, "source": str(s.path)})
        return out

    def load_latents(self, item: dict) -> dict[str, torch.Tensor]:
        return load_file(str(self.dir / item["latent"]))

    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        """The prompt's conditioning dict (without a batch dimension)."""
        return _load_text(str(self.dir / self.index["texts"][prompt]))


@functools.lru_cache(maxsize=256)
def _load_text(path: str) -> dict[str, torch.Tensor]:
    return load_file(path)


def bucket_of(item: dict) -> Bucket:
    return Bucket(*item["bucket"])
