"""Model families: what the pipeline, the CLI, the nodes and the trainer know about a kind of model.

A family module (``cogvideox.py``) states a family's facts once: how its files are recognised,
its loaders, frame and size rules, fps, latent layout, prediction type and schedule defaults, how
image conditioning is assembled, its LoRA targets and the blocks FSDP wraps. Everything above
the models asks the family; nothing above it imports a family module.

``FAMILIES`` is a plain dict of the registered families, in detection order. :func:`detect` is
the one detection function: it finds the family of a model folder, and names what a weight file
looks like, both for dispatch and for "expected X, but this looks like Y" errors.

The package's files, one concept each: ``base.py`` (the :class:`Family` base class and its size
helpers), ``folder.py`` (what a model folder says about sampling), ``registry.py`` (the registered
families and finding the family of a folder, file or transformer), ``choices.py`` (the sizes,
durations and VAE presets the nodes and CLI offer, and the releases' facts their tooltips and help quote); the key signatures themselves live in
:mod:`vdit_core.detect`, which the loaders below the families read.
"""

from __future__ import annotations

from ..detect import OTHER_SIGNATURES, Signature, describe, detect, signatures
from ..text import load_t5_encoder
from .base import Family, multiple_problem, neighbours
from .choices import duration_choices, parse_duration, parse_resolution, quote, release_facts, resolution_choices, vae_variants
from .folder import SCHEDULER_SAMPLERS, folder_defaults
from .registry import FAMILIES, file_keys, for_file, for_folder, for_transformer, get, register, unregister, weights_family

from . import cogvideox, hunyuandit, opensora  # noqa: E402  (each registers itself, in this order)

__all__ = ["folder_defaults", "SCHEDULER_SAMPLERS", "Family", "Signature", "FAMILIES", "register", "unregister", "detect", "describe", "get", "for_folder", "for_file",
           "for_transformer", "weights_family", "file_keys", "signatures", "vae_variants", "release_facts", "quote", "resolution_choices", "duration_choices", "parse_resolution", "parse_duration", "multiple_problem", "neighbours", "cogvideox", "hunyuandit", "opensora"]
