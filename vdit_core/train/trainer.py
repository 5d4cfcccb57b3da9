"""``python -m vdit_core.train``: LoRA or full finetuning, one process or many under torchrun.

This module is the only place with distributed logic (plus :mod:`.dist`'s rank helper):
process group set-up, DDP / FSDP2 wrapping, collectives for logging, NaN agreement, gathering
state for checkpoints, and validation. Randomness is a pure function of (seed, step, global
sample index), so a run gives the same result on any number of processes for the same global
batch, and resuming is exact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from ..fp8 import is_fp8
from .. import families
from ..checkpoint import CheckpointError, parse_dtype, read_json
from ..families import Family
from ..lora import LoRASet, inject_lora, save_lora
from ..memory import half_dtype
from ..attention import AttentionBackendError
from ..pipeline import Pipeline, check_device, frames_conditioning, network_call, torch_version
from ..schedules import FlowSchedule
from ..timesteps import logit_normal_sigmas, stratified_timesteps, uniform_timesteps
from ..vae.common import sample_posterior
from . import dist as vdist
from .cache import CacheSpec, LatentCache, bucket_of
from .config import TrainConfig, parse_config, to_toml
from .data import Bucket, Report, parse_buckets, scan

CKPT_RE = re.compile(r"^step-(\d{7})$")


class TrainModule(nn.Module):
    """The transformer and its LoRA adapters as one module, so DDP/FSDP see the adapters."""

    def __init__(self, transformer: nn.Module, lora: LoRASet | None):
        super().__init__()
        self.transformer = transformer
        self.lora = lora

    def forward(self, x, t, **cond):
        return network_call(self.transformer, x, t, **cond)  # the pipeline's own network call


def _log(msg: str) -> None:
    if vdist.is_main():
        tqdm.write(msg)


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), stable across runs and machines."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class BatchPlan:
    """Deterministic global micro-batches: per epoch, each bucket's clips shuffled and cut into
    batches of ``size`` (remainders dropped), then the batches shuffled."""

    def __init__(self, items: list[dict], size: int, seed: int):
        self.items, self.size, self.seed = items, size, seed
        self.by_bucket: dict[Bucket, list[int]] = {}
        for i, it in enumerate(items):
            self.by_bucket.setdefault(bucket_of(it), []).append(i)
        self.per_epoch = sum(len(v) // size for v in self.by_bucket.values())
        if self.per_epoch == 0:
            sizes = ", ".join(f"{b}: {len(v)}" for b, v in self.by_bucket.items())
            raise ValueError(f"no bucket holds a whole global batch of {size} clip(s) (clips per bucket: {sizes}); use a smaller batch")
        self._epoch, self._batches = None, None

    def batch(self, k: int) -> list[int]:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch))
            batches = []
            for b in sorted(self.by_bucket, key=str):
                idx = self.by_bucket[b]
                perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
                batches += [perm[i : i + self.size] for i in range(0, len(perm) - self.size + 1, self.size)]
            order = torch.randperm(len(batches), generator=g).tolist()
            self._epoch, self._batches = epoch, [batches[i] for i in order]
        return self._batches[j]


# ----------------------------------------------------------------------------------------------
# set-up


def _setup_distributed(cfg: TrainConfig, device: torch.device) -> torch.device:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device.type == "cuda"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=cfg.dist_timeout_minutes)
        )
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _mixed_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if device.type == "cuda" else "no"
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mp]


def _checkpoints(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)), key=lambda p: p.name)


# ----------------------------------------------------------------------------------------------
# the run


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
        device = check_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = _setup_distributed(cfg, device)
    try:
        run(cfg, device)
    except (ValueError, CheckpointError, AttentionBackendError) as e:
        print(f"error (rank {vdist.rank()}): {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if vdist.is_main():
            ckpts = _checkpoints(Path(cfg.output))
            where = f"the newest checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            print(f"\ninterrupted; {where}; run the same command with --resume to continue", file=sys.stderr)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# what a run writes into --output (its latent cache, also there by default, may be reused by a new run)
RUN_OUTPUTS = ("config.toml", "losses.jsonl", "checkpoints", "lora.safetensors", "lora_ema.safetensors", "transformer",
               "transformer_ema", "validation", "tensorboard")


def _claim_output(cfg: TrainConfig) -> None:
    """A new run (no --resume) never writes over an earlier one: refused, or with --overwrite the
    earlier run's outputs are removed first (its latent cache is kept). Runs before anything else."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out}: is a file, not a folder")
    earlier = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 removes anything
    if cfg.resume or not earlier:
        return
    if not cfg.overwrite:
        raise ValueError(f"--output {out}: holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, "
                         "--overwrite to replace it, or choose another folder")
    if vdist.is_main():
        for name in earlier:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if dist.is_initialized():
        dist.barrier()


@dataclass
class Model:
    """The model a run trains, and what its family says about it."""

    family: Family
    transformer: nn.Module
    defaults: dict  # schedule, sampler, steps, cfg, vae_scale
    folder: Path

    @property
    def config(self):
        return self.transformer.config

    @property
    def name(self) -> str:
        return self.family.preset_name(self.config) or f"a {self.family.label} model"


def run(cfg: TrainConfig, device: torch.device) -> dict:
    """Train as ``cfg`` says; returns a summary (final step, last loss)."""
    world = vdist.world_size()
    out = Path(cfg.output)
    if world > 1 and _strategy(cfg, world, device) == "fsdp" and torch_version() < (2, 6):
        raise ValueError(f"strategy fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) needs PyTorch 2.6 or later (this is "
                         f"{torch.__version__}); upgrade torch, or use --strategy ddp")
    _claim_output(cfg)
    mp_dtype = _mixed_precision(cfg, device)
    # rank 0 builds the latent cache with the VAE and T5 on its device (T5-XXL's encoder alone is
    # 19 GB in float32): its transformer waits in CPU memory until they are freed
    m = _load_model(cfg, torch.device("cpu") if vdist.is_main() else device, mp_dtype)
    if not cfg.lora_targets:  # record the targets the run really uses
        cfg = dataclasses.replace(cfg, lora_targets=m.family.lora_targets)
    if vdist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.toml").write_text(to_toml(cfg.to_dict()))
    cache, items = _prepare_data(cfg, m, device)
    m.transformer.to(device)  # the cache's encoders are freed by now
    micro = cfg.batch_size * world
    plan = BatchPlan(items, micro, cfg.seed)
    _log(f"training {'the full transformer' if cfg.full else f'a rank-{cfg.lora_rank} LoRA'} of {m.name} "
         f"on {len(items)} clips; {world} process(es) x batch {cfg.batch_size} x {cfg.grad_accum} accumulation; {plan.per_epoch} batches/epoch")

    module, params, wrapped, strategy, resume_dir = _trainable(cfg, m, device, mp_dtype, out)
    optimizer, scheduler = _optimizer(cfg, params)
    scaler = torch.amp.GradScaler(device.type, enabled=mp_dtype == torch.float16)
    ema = [p.detach().clone().float() for p in params] if cfg.ema_decay > 0 else None
    step = 0
    if resume_dir is not None:
        step = _load_training_state(resume_dir, module, optimizer, scheduler, scaler, ema, strategy, world)
        _log(f"resumed from {resume_dir} at step {step}: {_resume_settings(resume_dir, cfg, optimizer, scheduler)}")

    denoiser = m.family.denoiser(wrapped, m.defaults["schedule"])
    batches = BatchMaker(cfg, m, plan, cache, items, device)
    writer = _tensorboard(out) if vdist.is_main() else None
    log_file = open(out / "losses.jsonl", "a") if vdist.is_main() else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not vdist.is_main(), desc="training", dynamic_ncols=True)
    last_loss, bad_in_a_row = float("nan"), 0
    t_start = time.perf_counter()

    while step < cfg.steps:
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        mean_loss, finite, all_t = _train_step(cfg, step, batches, denoiser, wrapped, scaler, device, mp_dtype)
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            _log(f"step {step + 1}: the loss is {mean_loss} (not finite); this step made no update")
            if bad_in_a_row >= 10:
                raise ValueError(f"step {step + 1}: 10 steps in a row had non-finite losses; stopping (try a lower --lr or --mixed-precision no)")
        else:
            bad_in_a_row = 0
            _update(cfg, optimizer, scheduler, scaler, params, ema)
        step += 1
        last_loss = mean_loss
        dt = time.perf_counter() - t0
        if vdist.is_main():
            rec = {"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0], "t": [t.tolist() for t in all_t]}
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()
            if writer is not None:
                writer.add_scalar("loss", last_loss, step)
                writer.add_scalar("lr", rec["lr"], step)
            bar.set_postfix(loss=f"{last_loss:.4f}", s_per_step=f"{dt:.2f}", samples_per_s=f"{micro * cfg.grad_accum / dt:.1f}")
            bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            _save_checkpoint(out, step, module, optimizer, scheduler, scaler, ema, cfg, strategy)
        if cfg.validation_prompts and ((cfg.validation_every and step % cfg.validation_every == 0) or step == cfg.steps):
            _validate(cfg, step, m, cache, device, mp_dtype, strategy)
    bar.close()
    if log_file is not None:
        log_file.close()
    _save_final(out, module, ema, cfg, strategy, m)
    _log(f"done: {step} steps in {time.perf_counter() - t_start:.0f} s; last loss {last_loss:.4f}; outputs in {out}")
    return {"step": step, "loss": last_loss}


# ----------------------------------------------------------------------------------------------
# the steps of a run


def _load_model(cfg: TrainConfig, device: torch.device, mp_dtype: torch.dtype | None) -> Model:
    folder = Path(cfg.model)
    family = families.for_folder(folder)
    base_dtype = torch.float32 if cfg.full or mp_dtype is None else mp_dtype  # fp32 master weights when trained
    transformer = family.load_transformer(folder / "transformer", dtype=base_dtype, device=device)
    if cfg.full and any(is_fp8(p) for p in transformer.parameters()):
        raise ValueError(f"{folder / 'transformer'}: its weights are float8; full finetuning needs the full-precision release "
                         "(a LoRA trains on float8 weights)")
    return Model(family, transformer, family.model_defaults(folder, transformer.config), folder)


def _prepare_data(cfg: TrainConfig, m: Model, device: torch.device) -> tuple[LatentCache, list[dict]]:
    """Buckets checked against the family's rules; the dataset scanned; VAE posteriors and text
    conditioning cached (rank 0 encodes, everybody reads)."""
    family, scale = m.family, m.defaults["vae_scale"]
    f0, h0, w0 = family.default_size(m.config, scale)
    sizes, frame_buckets = parse_buckets(cfg.buckets, cfg.frame_buckets, Bucket(cfg.frames or f0, cfg.height or h0, cfg.width or w0))
    for f in frame_buckets:
        for h, w in sizes:
            problem = family.size_problem(f, h, w, m.config, scale, frames_label="frame bucket")
            if problem:
                raise ValueError(f"bucket {f}x{h}x{w}: {problem}")
    report = Report()
    samples = scan(cfg.data, report)
    vae_config = read_json(m.folder / "vae" / "config.json")
    cache_dtype = parse_dtype(None if cfg.cache_dtype == "auto" else cfg.cache_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    # the encoders in half precision on a GPU (each loader keeps its model safe in it: T5's wo in
    # float32 under float16, Open-Sora's VAE never float16)
    encode_dtype = half_dtype(device)
    spec = CacheSpec(
        vae_path=m.folder / "vae", text_path=m.folder / "text_encoder", vae_config=vae_config, sizes=sizes,
        frame_buckets=frame_buckets, frame_stride=cfg.frame_stride, model_fps=float(family.fps(m.config)), dtype=cache_dtype,
        hflip=cfg.hflip > 0, image_latents=family.is_image_to_video(m.config), encode_dtype=encode_dtype,
    )
    cache = LatentCache(Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output) / "cache", spec)
    prompts = [s.caption for s in samples] + [""] + list(cfg.validation_prompts)

    def text_encoder():
        encoder = family.load_text_encoder(m.folder, encode_dtype, device)
        return lambda prompt: family.encode_text(encoder, prompt)

    if vdist.is_main():
        cache.build(
            samples, prompts, report,
            load_vae=lambda: family.load_vae(m.folder / "vae", encode_dtype, device),
            load_text=text_encoder,
            progress=lambda it, **kw: tqdm(it, **kw),
        )
    if dist.is_initialized():
        dist.barrier()
        cache = LatentCache(cache.dir.parent, spec)  # re-read the index rank 0 wrote
    items = cache.items(samples)
    report.usable = len(items)
    for line in report.lines():
        _log(line)
    if not items:
        why = f"all {len(report.skipped)} file(s) were skipped (reasons above)" if report.skipped else "it holds no videos or images with captions"
        raise ValueError(f"--data {cfg.data}: no usable clips: {why}")
    return cache, items


def _strategy(cfg: TrainConfig, world: int, device: torch.device) -> str:
    """"ddp" or "fsdp" (FSDP2: full finetuning on several GPUs, unless the config says)."""
    if cfg.strategy != "auto":
        return cfg.strategy
    return "fsdp" if (cfg.full and world > 1 and device.type == "cuda") else "ddp"


def _trainable(cfg: TrainConfig, m: Model, device, mp_dtype, out: Path):
    """The trainable module (transformer + LoRA), resumed weights, and its DDP/FSDP2 wrapping:
    (module, trainable params, wrapped module, strategy, checkpoint resumed from or None)."""
    rank, world = vdist.rank(), vdist.world_size()
    transformer = m.transformer
    torch.manual_seed(cfg.seed)  # adapter initialisation: the same on every rank and every run
    transformer.gradient_checkpointing = cfg.gradient_checkpointing
    lora = None
    if cfg.full:
        transformer.requires_grad_(True)
    else:
        transformer.requires_grad_(False)
        lora = inject_lora(transformer, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, dtype=torch.float32)
    module = TrainModule(transformer, lora).train()
    checkpoints = _checkpoints(out) if cfg.resume else []
    resume_dir = checkpoints[-1] if checkpoints else None
    if cfg.resume and resume_dir is None:
        _log(f"--resume: no complete checkpoint in {out / 'checkpoints'}; starting from the beginning")
    if resume_dir is not None:
        _load_weights(module, resume_dir, cfg, device)

    strategy = _strategy(cfg, world, device)
    wrapped: nn.Module = module
    if world > 1 and strategy == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    elif world > 1 and strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=mp_dtype or torch.float32, reduce_dtype=torch.float32)
        for block in m.family.blocks(transformer):
            fully_shard(block, mp_policy=policy)
        fully_shard(module, mp_policy=policy)
    torch.manual_seed(_mix(cfg.seed, 3, rank))  # each rank's own stream for dropout
    params = [p for p in module.parameters() if p.requires_grad]
    return module, params, wrapped, strategy, resume_dir


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter]):
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    def lr_factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _train_step(cfg, step, batches, denoiser, wrapped, scaler, device, mp_dtype) -> tuple[float, bool, list[torch.Tensor]]:
    """Forward and backward over the step's accumulated micro-batches: (mean loss over every
    rank, whether every rank's loss was finite, the global batches' timesteps)."""
    world = vdist.world_size()
    losses, bad, all_t = [], torch.zeros(1, device=device), []
    weighting = "min_snr" if cfg.min_snr_gamma > 0 else None
    for a in range(cfg.grad_accum):
        batch, t_global = batches.make(step * cfg.grad_accum + a)
        all_t.append(t_global)
        sync = a == cfg.grad_accum - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
        ctx = wrapped.no_sync() if not sync else contextlib.nullcontext()
        with ctx, _autocast(device, mp_dtype):
            loss = denoiser.loss(batch["x0"], batch["noise"], batch["sigma"], weighting, cfg.min_snr_gamma or 5.0, **batch["cond"]).mean()
            if not torch.isfinite(loss):
                bad += 1
            scaler.scale(loss / cfg.grad_accum).backward()
        losses.append(loss.detach())
    mean_loss = torch.stack(losses).mean()
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        dist.all_reduce(mean_loss, op=dist.ReduceOp.SUM)
        mean_loss /= world
    return mean_loss.item(), bad.item() == 0, all_t


def _update(cfg, optimizer, scheduler, scaler, params, ema) -> None:
    scaler.unscale_(optimizer)
    if cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(cfg.ema_decay).add_(p.detach().float(), alpha=1 - cfg.ema_decay)


class BatchMaker:
    """This rank's part of each global micro-batch, assembled from the cache as the family says
    (latent padding, image conditioning); all randomness from (seed, micro-batch, sample index)."""

    def __init__(self, cfg: TrainConfig, m: Model, plan: BatchPlan, cache: LatentCache, items: list[dict], device: torch.device):
        self.cfg, self.m, self.plan, self.cache, self.items, self.device = cfg, m, plan, cache, items, device
        self.schedule = m.defaults["schedule"]
        sampling, family_default = cfg.timestep_sampling, m.family.default_timestep_sampling()
        if sampling == "auto":  # the family's (Open-Sora: logit-normal), else stratified bands when distributed
            sampling = family_default if family_default != "uniform" else ("stratified" if vdist.world_size() > 1 else "uniform")
        self.sampling = sampling
        self.vae_info = m.family.vae_info(cache.spec.vae_config)
        self.spatial_scale = m.defaults.get("vae_scale", 8)
        self.empty = {k: v.to(device) for k, v in cache.text("").items()}

    def _timesteps(self, n: int, g: torch.Generator) -> torch.Tensor:
        """Timesteps of the global micro-batch: integers, or for flow schedules with logit-normal
        sampling, continuous (float64) as Open-Sora trains."""
        T = self.schedule.num_timesteps
        if self.sampling == "stratified":
            return stratified_timesteps(n, T, 0, 1, g)  # bands over the global batch; ranks slice
        if self.sampling == "logit_normal":
            sigmas = logit_normal_sigmas(n, generator=g)
            if isinstance(self.schedule, FlowSchedule):
                return sigmas * T
            return (sigmas * T).long().clamp(max=T - 1)
        return uniform_timesteps(n, T, g)

    def make(self, k: int) -> tuple[dict, torch.Tensor]:
        cfg, family, mcfg, cache = self.cfg, self.m.family, self.m.config, self.cache
        idx = self.plan.batch(k)
        t_all = self._timesteps(len(idx), torch.Generator().manual_seed(_mix(cfg.seed, 1, k)))
        rank = vdist.rank()
        lo, hi = rank * cfg.batch_size, (rank + 1) * cfg.batch_size
        x0s, noises, conds = [], [], []
        for gi in range(lo, hi):
            item = self.items[idx[gi]]
            g = torch.Generator().manual_seed(_mix(cfg.seed, 2, k, gi))
            flip = cfg.hflip > 0 and torch.rand((), generator=g).item() < cfg.hflip
            groups = family.caption_groups or (tuple(self.empty),)  # dropped independently (HunyuanDiT: per encoder)
            drops = [torch.rand((), generator=g).item() < cfg.caption_dropout for _ in groups]
            tensors = cache.load_latents(item)
            x0 = sample_posterior(tensors["moments_flip" if flip else "moments"], dim=0, generator=g) * self.vae_info["scaling_factor"]
            x0 = family.pad_latents(mcfg, x0[None])[0]  # [C, T, h, w]
            x0s.append(x0)
            noises.append(torch.randn(x0.shape, generator=g))
            cond = {k_: v.to(self.device) for k_, v in cache.text(item["caption"]).items()}
            for group, drop in zip(groups, drops):
                if drop:  # the empty prompt's conditioning, so CFG keeps working
                    cond.update({k_: self.empty[k_] for k_ in group})
            if "image_moments" in tensors:
                img = sample_posterior(tensors["image_moments_flip" if flip else "image_moments"], dim=0, generator=g)
                img = img * family.image_latent_scale(self.vae_info)
                cond.update({k_: v[0] for k_, v in frames_conditioning(family, mcfg, img[None], x0.shape[1]).items()})
            cond.update({k_: v[0].to(self.device) for k_, v in family.sample_conditioning(mcfg, (1, *x0.shape), self.spatial_scale).items()})
            conds.append(cond)
        t = t_all[lo:hi]
        batch = {
            "x0": torch.stack(x0s).to(self.device),
            "noise": torch.stack(noises).to(self.device),
            "sigma": family.train_sigmas(self.schedule.sigma(t.double()), (len(x0s), *x0s[0].shape), self.spatial_scale).to(self.device),
            "cond": {key: torch.stack([c[key] for c in conds]).to(self.device, _cond_dtype(conds[0][key])) for key in conds[0]},
        }
        return batch, t_all


def _cond_dtype(t: torch.Tensor) -> torch.dtype:
    """Conditioning trains in float32 (the cache may hold bf16); masks keep their dtype."""
    return torch.float32 if t.is_floating_point() else t.dtype


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


# ----------------------------------------------------------------------------------------------
# checkpoints


def _trainable_state(module: TrainModule, strategy: str, world: int) -> dict[str, torch.Tensor]:
    """Full trainable weights on rank 0 (a collective under FSDP2)."""
    if world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        sd = module.state_dict()
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def _optimizer_state(module, optimizer, strategy, world) -> dict:
    if world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _save_checkpoint(out, step, module, optimizer, scheduler, scaler, ema, cfg, strategy) -> None:
    """Everything needed to continue exactly, written to ``step-N.tmp`` and renamed, by rank 0."""
    world = vdist.world_size()
    device = next(module.parameters()).device
    weights = _trainable_state(module, strategy, world)
    opt_state = _optimizer_state(module, optimizer, strategy, world)
    rng = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(rng, _rng_state(device))
    else:
        rng = [_rng_state(device)]
    if not vdist.is_main():
        return
    previous = _checkpoints(out)
    last_good = previous[-1] if previous else None
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if ema is not None:
        bad += ["ema"] if not all(torch.isfinite(e).all() for e in ema) else []
    if bad:  # never a checkpoint of exploded weights; the good ones stay (rotation runs only after a save)
        _log(f"step {step}: not saving a checkpoint: {len(bad)} weight tensor(s) are not finite (e.g. {bad[0]}); "
             f"the last good checkpoint is {last_good or 'none'}")
        return
    root = out / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp"
    from safetensors.torch import save_file

    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in weights.items()}, str(tmp / "trainable.safetensors"))
        torch.save(opt_state, tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng}, tmp / "state.pt")
        if ema is not None:
            names = [n for n, p in module.named_parameters() if p.requires_grad]
            save_file({n: e.detach().cpu().contiguous() for n, e in zip(names, ema)}, str(tmp / "ema.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, "micro_batches": step * cfg.grad_accum, "world_size": world, "full": cfg.full}))
        (tmp / "config.toml").write_text(to_toml(cfg.to_dict()))
    except (OSError, RuntimeError) as e:  # a full disk shows up as either
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"step {step}: writing the checkpoint to {root} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"the previous checkpoint {last_good or '(none)'} is intact") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: a kill before this line leaves the previous checkpoint as the newest
    for old in _checkpoints(out)[: -cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)


def _load_weights(module: TrainModule, ckpt: Path, cfg: TrainConfig, device) -> None:
    from safetensors.torch import load_file

    state = json.loads((ckpt / "state.json").read_text())
    if bool(state["full"]) != cfg.full:
        raise ValueError(f"{ckpt}: a {'full' if state['full'] else 'LoRA'} checkpoint cannot resume a {'full' if cfg.full else 'LoRA'} run")
    weights = load_file(str(ckpt / "trainable.safetensors"))
    own = dict(module.named_parameters())
    missing = [k for k, p in own.items() if p.requires_grad and k not in weights]
    if missing or any(k not in own for k in weights):
        raise ValueError(f"{ckpt}: its trainable weights do not fit this run (e.g. {missing[:2]}); was the LoRA rank or target set changed?")
    wrong = [k for k, v in weights.items() if tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"{ckpt}: its weights have other shapes than this run's (e.g. {k}: checkpoint {tuple(weights[k].shape)}, "
                         f"this run {tuple(own[k].shape)}); was the LoRA rank changed? Resume with the checkpoint's settings "
                         "or start a new run in another --output")
    with torch.no_grad():
        for k, v in weights.items():
            own[k].copy_(v.to(own[k].dtype))


# what a resume takes from the checkpoint; every other setting comes from this run's command line
RESUMED = "weights, optimizer moments, EMA, random state and data position"
# settings whose change the resumed optimizer applies from the next step on
OPTIMIZER_SETTINGS = ("lr", "adam_beta1", "adam_beta2", "adam_eps", "weight_decay")


def _resume_settings(ckpt: Path, cfg: TrainConfig, optimizer, scheduler) -> str:
    """Apply this run's optimizer settings to the resumed optimizer (the checkpoint's would
    silently win otherwise) and say which settings differ from the checkpoint's run."""
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(lr=cfg.lr * factor(scheduler.last_epoch), initial_lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                     eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
    try:
        import tomllib

        before = tomllib.loads((ckpt / "config.toml").read_text())
    except (OSError, ValueError, ImportError):
        before = {}
    ignore = {"resume", "overwrite", "config"}
    changed = [f"{k} {v!r} (was {before[k]!r})" for k, v in cfg.to_dict().items() if k in before and k not in ignore and before[k] != v]
    return f"{RESUMED} from the checkpoint; everything else from this command" + (f": changed {', '.join(changed)}" if changed else "")


def _load_training_state(ckpt, module, optimizer, scheduler, scaler, ema, strategy, world) -> int:
    state = json.loads((ckpt / "state.json").read_text())
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    if world > 1 and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, opt, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(opt)
    rest = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(rest["scheduler"])
    scaler.load_state_dict(rest["scaler"])
    rng = rest["rng"]
    mine = rng[vdist.rank()] if vdist.rank() < len(rng) else rng[0]
    torch.set_rng_state(mine["torch"])
    if "cuda" in mine and torch.cuda.is_available():
        torch.cuda.set_rng_state(mine["cuda"])
    if ema is not None and (ckpt / "ema.safetensors").exists():
        from safetensors.torch import load_file

        saved = load_file(str(ckpt / "ema.safetensors"))
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        for e, n in zip(ema, names):
            e.copy_(saved[n])
    return int(state["step"])


def _save_final(out, module, ema, cfg, strategy, m: Model) -> None:
    world = vdist.world_size()
    weights = _trainable_state(module, strategy, world)
    ema_weights = None
    if ema is not None:
        names = [n for n, p in module.named_parameters() if p.requires_grad]
        ema_weights = dict(zip(names, ema))
    if not vdist.is_main():
        return
    bad = [k for k, v in {**weights, **(ema_weights or {})}.items() if not torch.isfinite(v).all()]
    if bad:
        ckpts = _checkpoints(out)
        raise ValueError(f"the trained weights are not finite (e.g. {bad[0]}); nothing was written to {out} "
                         f"(the last good checkpoint is {ckpts[-1] if ckpts else 'none'}); try a lower --lr")
    if cfg.full:
        # the layout it was loaded from, in the dtype of the original weights
        from safetensors import safe_open

        from ..checkpoint import weight_files

        src = weight_files(m.folder / "transformer")[0]
        with safe_open(str(src), "pt") as f:
            dtype = f.get_tensor(next(iter(f.keys()))).dtype
        for name, w in (("transformer", weights), ("transformer_ema", ema_weights)):
            if w is None:
                continue
            sd = {k.removeprefix("transformer."): v for k, v in w.items()}
            m.family.save_transformer(module.transformer, out / name, dtype=dtype, state_dict={**module.transformer.state_dict(), **sd})
        return
    base = m.family.preset_name(m.config) or str(m.folder)
    for name, w in (("lora.safetensors", weights), ("lora_ema.safetensors", ema_weights)):
        if w is not None:
            save_lora(module.lora, out / name, base_model=base, state={k.removeprefix("lora."): v for k, v in w.items()})


# ----------------------------------------------------------------------------------------------
# validation


@torch.no_grad()
def _validate(cfg, step, m: Model, cache, device, mp_dtype, strategy) -> None:
    """Sample the validation prompts with the project's pipeline; rank 0 writes the mp4s. Under
    DDP the prompts are shared out among ranks; under FSDP2 every rank runs all of them in step."""
    from ..video_io import write_video

    rank, world = vdist.rank(), vdist.world_size()
    prompts = list(cfg.validation_prompts)
    mine = list(range(len(prompts))) if (strategy == "fsdp" and world > 1) else list(range(rank, len(prompts), world))
    transformer = m.transformer
    was_training = transformer.training
    transformer.eval()
    pipe = Pipeline(transformer=transformer, vae=None, text_encoder=None, family=m.family, **m.defaults)
    f0, h0, w0 = pipe.default_size
    frames, h, w = cfg.frames or f0, cfg.height or h0, cfg.width or w0
    results = {}
    empty = {k: v.to(device)[None] for k, v in cache.text("").items()}
    for i in mine:
        cond = {k: v.to(device)[None] for k, v in cache.text(prompts[i]).items()}
        request = pipe.prepare(cond=cond, uncond=empty, num_frames=frames, height=h, width=w, seed=cfg.seed + i,
                               steps=cfg.validation_steps, cfg=cfg.validation_cfg)
        with _autocast(device, mp_dtype):
            lat = pipe.run(request, progress=False)
        results[i] = request.crop(lat).cpu()
    if world > 1 and strategy != "fsdp":
        gathered = [None] * world
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    if was_training:
        transformer.train()
    if not vdist.is_main():
        return
    pipe.vae = m.family.load_vae(m.folder / "vae", half_dtype(device), device)  # beside the transformer: half precision on a GPU, as the cache's
    folder = Path(cfg.output) / "validation" / f"step-{step:07d}"
    for i, lat in sorted(results.items()):
        slug = re.sub(r"[^a-z0-9]+", "-", prompts[i].lower()).strip("-")[:40]
        write_video(folder / f"{i:02d}-{slug}.mp4", pipe.decode(lat), fps=pipe.fps)
    pipe.vae = None
    _log(f"step {step}: validation videos in {folder}")


__all__ = ["main", "run", "TrainModule", "BatchPlan", "BatchMaker"]
