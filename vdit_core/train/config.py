"""Training configuration: one frozen dataclass, set from a TOML file and command-line flags.

Every field is a flag (``--lora-rank``) and a TOML key (``lora_rank`` or ``lora-rank``); flags
override the file. The effective config is written next to the checkpoints as ``config.toml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class TrainConfig:
    """What a training run does. Defaults follow the field's common practice (see the README)."""

    model: str = ""  # model folder of any family (transformer/, vae/, text_encoder/, tokenizer/)
    data: str = ""  # folder of videos/images + same-name .txt captions, or with metadata.csv/.jsonl
    output: str = ""
    # what is trained
    full: bool = False  # full finetune instead of LoRA
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_targets: str = ""  # regex over module names; empty: the model family's (attention q/k/v/out and FFN)
    lora_dropout: float = 0.0
    # optimisation
    steps: int = 1000  # optimizer steps
    batch_size: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.0  # 0 disables EMA
    mixed_precision: str = "auto"  # auto (bf16 on CUDA, no on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = True
    # data
    frames: int = 0  # 0: the model's training length (49 for CogVideoX 1.0)
    height: int = 0  # 0: the model's training size
    width: int = 0
    buckets: str = ""  # e.g. "480x720,720x480": each clip goes to the closest aspect ratio
    frame_buckets: str = ""  # e.g. "17,33,49": each clip to the longest that fits
    frame_stride: int = 0  # 0: match the model's frame rate
    caption_dropout: float = 0.1  # empty prompt with this probability, so CFG keeps working
    hflip: float = 0.0  # horizontal flip probability (off: it breaks captions naming a direction)
    # noise
    timestep_sampling: str = "auto"  # auto (stratified when distributed, else uniform) | uniform | stratified | logit_normal
    min_snr_gamma: float = 0.0  # 0: the model's plain loss (v-MSE for CogVideoX)
    # checkpoints, validation, logging
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: bool = False
    overwrite: bool = False  # a new run may replace an earlier run's outputs in --output
    validation_prompts: list = field(default_factory=list)
    validation_every: int = 0  # 0: only at the end (when prompts are given)
    validation_steps: int = 25
    validation_cfg: float = 6.0
    cache_dir: str = ""  # default: <output>/cache
    cache_dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    seed: int = 0
    strategy: str = "auto"  # auto (FSDP2 for --full on several GPUs, else DDP) | ddp | fsdp
    dist_timeout_minutes: int = 60
    log_every: int = 1
    device: str = ""  # default: cuda when available
    config: str = ""  # the TOML file these values came from

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_HELP = {
    "model": "model folder (diffusers layout)",
    "data": "dataset folder",
    "output": "output folder (checkpoints, LoRA/transformer, config.toml, logs)",
    "full": "full finetune (default: LoRA)",
    "resume": "continue from the newest complete checkpoint in the output folder",
    "overwrite": "start a new run in an output folder that holds an earlier run, replacing its outputs (its latent cache is kept)",
    "config": "TOML file with any of these options (flags override it)",
    "validation_prompts": "prompt to sample during training (repeatable)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vdit_core.train",
        description="Finetune a video diffusion transformer (LoRA or full). Multi-GPU: torchrun --nproc_per_node=N -m vdit_core.train ...",
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = _HELP.get(f.name)
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name == "validation_prompts":
            p.add_argument("--validation-prompt", dest=f.name, action="append", default=None, help=help_)
        else:
            kind = {"int": int, "float": float}.get(f.type, str)
            p.add_argument(flag, type=kind, default=None, help=help_)
    return p


def _normalise(raw: dict, source: str) -> dict:
    names = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        key = k.replace("-", "_")
        if key == "validation_prompt":
            key, v = "validation_prompts", [v] if isinstance(v, str) else v
        if key not in names:
            raise ValueError(f"{source}: unknown option {k!r}")
        out[key] = v
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags over the TOML file (``--config``) over the defaults. Checks values."""
    args = build_parser().parse_args(argv)
    values: dict = {}
    if args.config:
        path = Path(args.config)
        try:
            values.update(_normalise(tomllib.loads(path.read_text()), str(path)))
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ValueError(f"{path}: cannot read the config ({e})") from None
        values["config"] = str(path)
    values.update({k: v for k, v in vars(args).items() if v is not None})
    cfg = TrainConfig(**values)
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    for name in ("model", "data", "output"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required (as a flag or in the config file)")
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be constant or cosine, got {cfg.lr_schedule!r}")
    if cfg.mixed_precision not in ("auto", "no", "bf16", "fp16"):
        raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {cfg.mixed_precision!r}")
    if cfg.timestep_sampling not in ("auto", "uniform", "stratified", "logit_normal"):
        raise ValueError(f"unknown timestep_sampling {cfg.timestep_sampling!r}")
    if cfg.strategy not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"strategy must be auto, ddp or fsdp, got {cfg.strategy!r}")
    if not 0 <= cfg.caption_dropout <= 1 or not 0 <= cfg.hflip <= 1:
        raise ValueError("caption_dropout and hflip are probabilities in [0, 1]")
    if not 0 < cfg.lr < 1:  # also refuses NaN
        raise ValueError(f"lr={cfg.lr}: must be a positive number below 1 (1e-4 is typical for LoRA, 1e-5 for a full finetune)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --output and --overwrite replaces it: pass one of them")
    for name in ("steps", "batch_size", "grad_accum", "lora_rank", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")


def to_toml(values: dict) -> str:
    """A flat TOML document of str/int/float/bool/list values."""
    lines = []
    for k, v in values.items():
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(v, (int, float)):
            s = repr(v)
        elif isinstance(v, (list, tuple)):
            s = "[" + ", ".join(json.dumps(x) for x in v) + "]"
        else:
            s = json.dumps(str(v))  # a JSON string is a valid TOML basic string
        lines.append(f"{k} = {s}")
    return "\n".join(lines) + "\n"
