"""ComfyUI's own model objects around vdit_core's models, so that ComfyUI's samplers, schedulers,
model patches, previews and memory management work on them. Needs ComfyUI (imported by the
nodes only inside it).

* MODEL: a model patcher around :class:`VDITModel` (ComfyUI's ``BaseModel``), whose diffusion
  model (:class:`VDITDiffusion`) calls the vdit transformer. The family's prediction type and
  schedule are ComfyUI model sampling (:func:`model_sampling`): v-prediction on the family's
  discrete schedule (zero terminal SNR clamped as ComfyUI clamps it), or rectified flow whose
  resolution/length shift is applied to the sigmas of each run (:func:`shift_sigmas`).
* CONDITIONING: ComfyUI's ``[[tensor, dict]]``: the family's main text states
  (:attr:`Family.text_state`) as the tensor, its other inputs (masks, mT5 states, the null
  caption flag) in the dict as ``vdit_<name>`` (:func:`conditioning`).
* LATENT holds the VAE's raw latents, as with ComfyUI's own video models; the model's latent
  format (:class:`VDITLatentFormat`) maps them to the model's (``process_in``) and back.
* VAE: ComfyUI's ``VAE`` with the vdit VAE as its first stage (:func:`native_vae`): chunked,
  memory-sized tiles, progress and cancel between chunks.
* LoRA: ComfyUI's own LoRA loading (LoraLoader, LoraLoaderModelOnly, hook LoRAs) patches the
  model's weights with every LoRA file vdit_core reads (ours, ComfyUI's, diffusers/PEFT, kohya,
  Tencent's HunyuanDiT): its key map of a vdit model holds each module name a file may use
  (:meth:`VDITModel.vdit_lora_key_map`), and a file module feeding several of ours is split by rows
  (:func:`lora_inputs`).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch

import comfy.conds
import comfy.latent_formats
import comfy.lora
import comfy.model_base
import comfy.model_management as mm
import comfy.model_patcher
import comfy.model_sampling as ms
import comfy.ops
import comfy.patcher_extension as pe
import comfy.samplers
import comfy.sd
import comfy.supported_models_base
import comfy.utils
from vdit_core.fp8 import FP8Linear, compute_dtype, is_fp8
from vdit_core.layers import Linear as VDITLinear
from vdit_core.layers import linear
from vdit_core.lora import LoRANames, lora_modules_of
from vdit_core.pipeline import check_request
from vdit_core.sampling import FLOW, SAMPLERS, STOCHASTIC_SAMPLERS, VE, SeededNoise
from vdit_core.schedules import TERMINAL_ALPHA_BAR, DiscreteSchedule, FlowSchedule, time_shift
from vdit_core.step_cache import StepCache

PREFIX = "vdit_"  # the conditioning dict's keys of a family's inputs besides its main text states
FAMILY_KEY = "vdit_family"  # the conditioning dict's record of the family a prompt was encoded for


# ----------------------------------------------------------------------------------------------
# latents and sampling


def channel_rgb(channels: int) -> tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]:
    """Preview factors for latents no factors were fitted to (Open-Sora's VAE, a model of another
    size): the first three channels as red, green and blue (the last repeated when there are fewer),
    at half strength for latents of about unit scale. A rough look at the layout and motion, not
    the colours; ComfyUI shows no preview without factors."""
    rows = [[0.0, 0.0, 0.0] for _ in range(channels)]
    for colour in range(3):
        rows[min(colour, channels - 1)][colour] = 0.5
    return tuple(tuple(r) for r in rows), (0.0, 0.0, 0.0)


class VDITLatentFormat(comfy.latent_formats.LatentFormat):
    """A family's latents: ``process_in`` takes the VAE's raw latents to the model's,
    ``(raw - shift) * scale`` per channel; the preview factors work on the model's."""

    latent_dimensions = 3

    def __init__(self, shift: tuple[float, ...], scale: tuple[float, ...], latent_rgb=None, spatial_scale: int = 8):
        self.latent_channels = len(scale)
        self.spacial_downscale_ratio = spatial_scale  # (newer ComfyUI reads it to fit empty latents to the model)
        self.shift, self.scale = torch.tensor(shift, dtype=torch.float32), torch.tensor(scale, dtype=torch.float32)
        self.scale_factor = float(scale[0])  # (what ComfyUI's own code reads of a uniform scale)
        if latent_rgb is None or len(latent_rgb[0]) != len(scale):  # (a family's factors fit its release VAE only)
            latent_rgb = channel_rgb(len(scale))
        self.latent_rgb_factors = [list(row) for row in latent_rgb[0]]
        self.latent_rgb_factors_bias = list(latent_rgb[1])

    def _per_channel(self, v: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        return v.to(device=latent.device, dtype=latent.dtype).view(1, -1, *([1] * (latent.ndim - 2)))

    def process_in(self, latent):
        return (latent - self._per_channel(self.shift, latent)) * self._per_channel(self.scale, latent)

    def process_out(self, latent):
        return latent / self._per_channel(self.scale, latent) + self._per_channel(self.shift, latent)


class DiscreteV(ms.V_PREDICTION, ms.ModelSamplingDiscrete):
    """v-prediction on a family's discrete schedule (:func:`model_sampling`)."""


class DiscreteEps(ms.EPS, ms.ModelSamplingDiscrete):
    """eps-prediction on a family's discrete schedule."""


class DiscreteX0(ms.X0, ms.ModelSamplingDiscrete):
    """x0-prediction on a family's discrete schedule."""


class Flow(ms.CONST, ms.ModelSamplingDiscreteFlow):
    """Rectified flow with no shift of its own: a run's sigmas get the family's resolution/length
    shift (:func:`shift_sigmas`)."""


def comfy_sigmas(schedule: DiscreteSchedule) -> torch.Tensor:
    """The schedule's sigma table, its zero-SNR end (sigma = inf) clamped as ComfyUI clamps it."""
    ac = schedule.alphas_cumprod.clone()
    if ac[-1] <= 0:
        ac[-1] = TERMINAL_ALPHA_BAR
    return ((1 - ac) / ac).sqrt()


def model_sampling(family, schedule) -> torch.nn.Module:
    """ComfyUI model sampling for a family's prediction type and schedule."""
    prediction = family.denoiser(None, schedule).prediction
    if isinstance(schedule, FlowSchedule):
        out = Flow()
        out.set_parameters(shift=1.0, timesteps=schedule.num_timesteps, multiplier=schedule.num_timesteps)
        return out
    classes = {"v": DiscreteV, "eps": DiscreteEps, "x0": DiscreteX0}
    if prediction not in classes:
        raise ValueError(f"{family.label}: no ComfyUI model sampling for {prediction!r} prediction")
    out = classes[prediction]()
    out.set_sigmas(comfy_sigmas(schedule))
    return out


def shift_sigmas(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """OUTER_SAMPLE wrapper: a flow family's sigmas shifted for this run's latent size (Open-Sora's
    resolution/length shift), unless a ModelSampling node replaced the model's sampling."""
    patcher = executor.class_obj.model_patcher
    model = patcher.model
    if isinstance(patcher.get_model_object("model_sampling"), Flow):
        shift = model.vdit_family.sigma_shift(tuple(noise.shape), model.vdit_spatial_scale)
        if shift != 1.0:
            sigmas = time_shift(sigmas.double(), shift).to(sigmas)
    return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)


# ----------------------------------------------------------------------------------------------
# the model


class VDITDiffusion(torch.nn.Module):
    """ComfyUI's diffusion model: ComfyUI's model input and timestep in, the transformer's output
    in ComfyUI's convention out (the noise channels only: learned-variance channels dropped; a
    flow velocity ``x0 - noise`` turned into ``noise - x0``). Runs through ComfyUI's
    DIFFUSION_MODEL wrappers (EasyCache and other model patches)."""

    def __init__(self, transformer: torch.nn.Module, family, negate: bool):
        super().__init__()
        self.transformer = transformer
        self.family = family
        self.negate = negate
        self.bool_inputs: set[str] = set()  # inputs sent as integers (ComfyUI casts other tensors to the model's dtype)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.transformer)

    def forward(self, x, timestep, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (ComfyUI's signature)
        wrappers = pe.get_all_wrappers(pe.WrappersMP.DIFFUSION_MODEL, transformer_options)
        return pe.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(x, timestep, context, control, transformer_options, **kwargs)

    def _forward(self, x, timestep, context, control, transformer_options, **kwargs):
        # x: [B, C, T, h, w], timestep: [B] -> [B, C, T, h, w]
        cond = {k[len(PREFIX):]: (v.bool() if k in self.bool_inputs else v) for k, v in kwargs.items() if k.startswith(PREFIX)}
        if context is not None:
            cond[self.family.text_state] = context
        cond.pop("frame_latents", None)  # held frames: VDITModel._apply_model keeps them clean
        mask = cond.pop("frame_mask", None)
        if mask is not None:
            cond[self.family.held_frames_input] = ~mask.bool()
        cond = self._paired(cond, transformer_options.get("cond_or_uncond") or [], x.shape[0])
        out = self.transformer(x, timestep, **cond)[:, : x.shape[1]]
        return -out if self.negate else out

    def _paired(self, cond: dict, order: list, batch: int) -> dict:
        """The family's pairing of the two CFG branches (an unconditional branch may borrow from
        the conditional one: Open-Sora's null caption takes the prompt's mask), where ComfyUI runs
        them in one batch: ``order`` says which chunk of the batch is which (0: cond, 1: uncond)."""
        if 0 not in order or 1 not in order or any(not isinstance(v, torch.Tensor) or v.shape[0] != batch for v in cond.values()):
            return cond
        chunks = {k: list(v.chunk(len(order))) for k, v in cond.items()}
        first = order.index(0)
        positive = {k: v[first] for k, v in chunks.items()}
        for i, kind in enumerate(order):
            if kind == 1:
                _, paired = self.family.pair_conditioning(positive, {k: v[i] for k, v in chunks.items()})
                for k in chunks:
                    chunks[k][i] = paired[k]
        return {k: torch.cat(v) for k, v in chunks.items()}


class VDITModelConfig(comfy.supported_models_base.BASE):
    """The model config ComfyUI's BaseModel is built from (the diffusion model is ours)."""

    unet_config = {}
    unet_extra_config = {}

    def __init__(self, latent_format: VDITLatentFormat):
        super().__init__(dict(self.unet_config))
        self.latent_format = latent_format


class VDITModel(comfy.model_base.BaseModel):
    """A vdit transformer as ComfyUI's model object: ComfyUI samples it like its own models."""

    def __init__(self, transformer: torch.nn.Module, family, folder, name: str, defaults: dict):
        schedule = defaults["schedule"]
        flow = isinstance(schedule, FlowSchedule)
        latent_format = VDITLatentFormat(*family.latent_scaling(folder, transformer.config), defaults.get("latent_rgb") or family.latent_rgb,
                                         int(defaults["vae_scale"]))
        model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.V_PREDICTION
        denoiser = family.denoiser(None, schedule)
        negate = flow and getattr(denoiser, "inner", denoiser).sign > 0  # Open-Sora's velocity is x0 - noise
        diffusion = VDITDiffusion(transformer, family, negate)
        # ComfyUI builds its diffusion model through unet_model: here the transformer already loaded
        super().__init__(VDITModelConfig(latent_format), model_type=model_type, unet_model=lambda **_: diffusion)
        self.model_sampling = model_sampling(family, schedule)
        self.vdit_family, self.vdit_name, self.vdit_spatial_scale = family, name, int(defaults["vae_scale"])
        self.vdit_defaults = defaults  # sampler, steps, cfg of the release (the Empty Latent and the workflows quote them)

    @property
    def vdit_config(self):
        return self.diffusion_model.transformer.config

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        """Frames held clean (``frame_latents`` where ``frame_mask``: Open-Sora's image and video
        conditioning): the network sees them clean and their denoised value is themselves, so any
        sampler leaves them where they are (as the family's FrameConditioned denoiser)."""
        mask = kwargs.get(PREFIX + "frame_mask")
        if mask is None:
            return super()._apply_model(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        keep = mask.to(x.device).bool()[:, None, :, None, None]  # [B, 1, T, 1, 1]
        clean = kwargs[PREFIX + "frame_latents"].to(x)
        held = torch.where(keep, clean, x)
        denoised = super()._apply_model(held, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        return torch.where(keep, clean, denoised)

    def memory_required(self, input_shape, cond_shapes=None, **kwargs):
        """Bytes ComfyUI keeps free for a pass over latents ``input_shape`` (its batch counts the
        CFG branches it batches): the family's estimate of the transformer's activations, which
        also decides whether ComfyUI batches the CFG branches together."""
        dtype = self.manual_cast_dtype or self.get_dtype()
        need = self.vdit_family.activation_bytes(self.vdit_config, tuple(input_shape), dtype)
        return super().memory_required(input_shape, cond_shapes or {}) if need is None else need

    def resize_cond_for_context_window(self, cond_key, cond_value, window, x_in, device, retain_index_list=()):
        """ComfyUI's context windows (newer ComfyUI asks the model before its own rule): a family
        input with a time axis, image or frame latents [B, C, T, h, w] and frame masks [B, T], is
        cut to the window's latent frames. None: ComfyUI's own rule applies."""
        t = getattr(cond_value, "cond", None)
        if not cond_key.startswith(PREFIX) or not isinstance(t, torch.Tensor) or getattr(window, "dim", None) != 2:
            return None
        dim = {5: 2, 2: 1}.get(t.ndim)  # the latent's time axis, or the mask's
        if dim is None or t.shape[dim] != x_in.shape[2]:
            return None
        kept = {"retain_index_list": list(retain_index_list)} if retain_index_list else {}  # newer ComfyUI's frames kept in every window
        return cond_value._copy_with(window.get_tensor(t, device, dim=dim, **kept))

    def extra_conds(self, **kwargs):
        encoded_for = kwargs.get(FAMILY_KEY, self.vdit_family.name)
        if encoded_for != self.vdit_family.name:
            raise ValueError(f"{kwargs.get('prompt_type', 'conditioning')}: encoded for {encoded_for}, but the model is {self.vdit_family.label}: "
                             f"set the text encoder loader's family to {self.vdit_family.name}")
        out = {}
        if kwargs.get("cross_attn") is not None:  # never padded by repeating tokens: masks and joint attention read every one
            out["c_crossattn"] = comfy.conds.CONDRegular(kwargs["cross_attn"])
        for k, v in kwargs.items():
            if k.startswith(PREFIX) and isinstance(v, torch.Tensor):
                if v.dtype == torch.bool:
                    self.diffusion_model.bool_inputs.add(k)
                    v = v.long()
                out[k] = comfy.conds.CONDRegular(v)
        noise = kwargs.get("noise")
        if noise is not None:  # inputs from the latent shape (Open-Sora's fps and pixel size), unless the conditioning gives them
            for k, v in self.vdit_family.sample_conditioning(self.vdit_config, tuple(noise.shape), self.vdit_spatial_scale).items():
                out.setdefault(PREFIX + k, comfy.conds.CONDRegular(v))
        return out

    def vdit_lora_key_map(self, key_map: dict) -> "LoRAKeyMap":
        """ComfyUI's LoRA key map (the given dict, extended) with every module name a LoRA file
        for this transformer may use (vdit_core's reader's rule), each mapped to its weight
        (:func:`patch_target`); a name feeding several of our modules (Tencent's fused q/k/v)
        maps to a :class:`RowSplit`."""
        names = LoRANames(self.diffusion_model.transformer)
        for name, targets in names.spellings().items():
            if len(targets) == 1:
                key_map[name] = patch_target(targets[0], names.linears[targets[0]])
            else:
                rows, parts = 0, []
                for target in targets:
                    parts.append((patch_target(target, names.linears[target]), rows, names.linears[target].out_features))
                    rows += parts[-1][2]
                key_map[name] = RowSplit(parts)
        shapes = {weight_key(n): tuple(m.weight.shape) for n, m in names.linears.items()}
        return LoRAKeyMap(key_map, f"vdit {self.vdit_family.label} transformer", shapes)


def patcher_class():
    """ComfyUI's plain model patcher. Not the ``CoreModelPatcher`` of newer versions: with dynamic
    VRAM that one streams only ComfyUI's own cast layers, and on plain torch modules it skips weight
    patches (LoRA) and uploads the whole model again on every load."""
    return comfy.model_patcher.ModelPatcher


class CastLinear(comfy.ops.disable_weight_init.Linear, VDITLinear):
    """vdit's Linear as ComfyUI's cast layer: streamed by ComfyUI's low-VRAM load, else vdit's."""


class CastFP8Linear(FP8Linear, comfy.ops.CastWeightBiasOp):
    """vdit's float8 Linear, streamable by ComfyUI's low-VRAM load: while ComfyUI marks it
    (``comfy_cast_weights``), its float8 weight, scale and bias come to the input's device for each
    call, and ComfyUI's patches of a streamed layer (``weight_function``: LoRA, in stored units)
    run on the stored weight in float32, before the scale. (ComfyUI 0.3.64 rounds the patched
    weight into float8 through :meth:`FP8Linear.set_weight`, as a full load does; newer versions
    keep it in float32.) ComfyUI's own cast layers cannot hold it: they would drop the scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out], in x's dtype
        if not (self.comfy_cast_weights or self.weight_function or self.bias_function):
            return super().forward(x)
        weight = self.weight.to(x.device, non_blocking=True).float()  # stored units (weight / scale)
        for f in self.weight_function:
            weight = f(weight)
        weight = (weight.float() * self.scale_weight.to(x.device).float()).to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype, non_blocking=True)
        for f in self.bias_function:
            bias = f(bias)
        return linear(x, weight, bias)


def castable(module: torch.nn.Module) -> torch.nn.Module:
    """``module``'s plain torch layers turned into ComfyUI's cast layers (``comfy.ops``) in place,
    so ComfyUI's low-VRAM load can keep their weights in CPU memory and bring each in as it runs;
    without them, a partial load leaves whole layers on the CPU and the forward fails. Only exact
    types change class (parameters, state dict and numerics stay); vdit's float8 layers become
    :class:`CastFP8Linear`; its float32 norm layers stay as they are (what they use follows the
    input's device)."""
    ops = comfy.ops.disable_weight_init
    table = {torch.nn.Linear: ops.Linear, VDITLinear: CastLinear, torch.nn.Conv2d: ops.Conv2d, torch.nn.Conv3d: ops.Conv3d,
             torch.nn.LayerNorm: ops.LayerNorm, torch.nn.GroupNorm: ops.GroupNorm, torch.nn.Embedding: ops.Embedding,
             FP8Linear: CastFP8Linear}
    for m in module.modules():
        cast = table.get(type(m))
        if cast is not None:
            m.__class__ = cast
            if not hasattr(m, "bias"):  # ComfyUI's cast reads a bias (Embedding has none)
                m.bias = None
    return module


def native_model(transformer: torch.nn.Module, family, folder, name: str, defaults: dict):
    """A loaded vdit transformer as a ComfyUI MODEL (a model patcher; ComfyUI loads and offloads it).
    On a GPU its layers become ComfyUI's cast layers (:func:`castable`): ComfyUI loads a model
    larger than the free memory partially only on a GPU, and the CPU keeps vdit's fused layers."""
    device = mm.get_torch_device()
    if torch.device(device).type != "cpu":
        castable(transformer)
    model = VDITModel(transformer, family, folder, name, defaults)
    patcher = patcher_class()(model, load_device=device, offload_device=mm.unet_offload_device())
    if isinstance(model.model_sampling, Flow):
        patcher.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, "vdit_sigma_shift", shift_sigmas)
    return patcher


def vdit_model(model, what: str = "model"):
    """The :class:`VDITModel` inside a MODEL, or a one-line refusal naming what it is instead."""
    inner = getattr(model, "model", None)
    if not isinstance(inner, VDITModel):
        raise ValueError(f"{what}: {type(inner).__name__} is not a vdit model; connect VDIT Load Model (a CogVideoX, HunyuanDiT or Open-Sora transformer)")
    return inner


# ----------------------------------------------------------------------------------------------
# vdit_core's samplers, dynamic CFG and step cache in ComfyUI's custom sampling


def sampler_noise(seed: int, x: torch.Tensor, family=None) -> SeededNoise:
    """A stochastic sampler's fresh noise for ComfyUI's seed: vdit_core's seeded stream (CPU
    generators, sample ``b`` seeded ``seed + b``; a vdit family's reference layout) after its first
    draw, which the pipeline takes as the initial noise. So it does not repeat ComfyUI's initial
    noise of the same seed (on the CPU ComfyUI's own samplers do), and a run started from the
    pipeline's initial noise of that seed draws what the pipeline's run draws."""
    source = SeededNoise(seed, x.shape, device=x.device, dtype=x.dtype, permute=getattr(family, "noise_permute", None))
    source()
    return source


class SamplerDenoiser:
    """ComfyUI's denoiser (what KSAMPLER hands its sampler function) with what vdit_core's
    samplers read: the noise form of the model's sampling (rectified flow for ComfyUI's CONST,
    else variance exploding, as ComfyUI's own samplers assume), and sigmas passed in ComfyUI's
    dtype (vdit_core's samplers pass float64)."""

    def __init__(self, model, noise_form, dtype: torch.dtype):
        self.model, self.noise_form, self.dtype = model, noise_form, dtype

    def __call__(self, x, sigma, **kwargs):
        return self.model(x, sigma.to(self.dtype), **kwargs)


def inner_model(denoiser):
    """The BaseModel behind the denoiser ComfyUI's KSAMPLER passes (KSamplerX0Inpaint -> guider ->
    model), or None (ComfyUI's own samplers reach it the same way)."""
    return getattr(getattr(denoiser, "inner_model", None), "inner_model", None)


class VDITSamplerFunction:
    """A vdit_core sampler as the function ComfyUI's ``KSAMPLER`` calls,
    ``f(model, x, sigmas, extra_args=..., callback=..., disable=..., **options)``. A stochastic
    sampler without a ``noise_sampler`` option draws from :func:`sampler_noise` of the run's seed
    (``extra_args["seed"]``: SamplerCustomAdvanced's noise seed, KSampler's seed)."""

    def __init__(self, name: str):
        if name not in SAMPLERS:
            raise ValueError(f"unknown vdit sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")
        self.name = name
        self.__name__ = f"sample_vdit_{name}"  # (newer ComfyUI logs the sampler function's name)

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        extra_args = {} if extra_args is None else extra_args
        base = inner_model(model)
        form = FLOW if isinstance(getattr(base, "model_sampling", None), ms.CONST) else VE
        seed = extra_args.get("seed")
        if self.name in STOCHASTIC_SAMPLERS and options.get("noise_sampler") is None and seed is not None:
            options["noise_sampler"] = sampler_noise(seed, x, getattr(base, "vdit_family", None))
        return SAMPLERS[self.name](SamplerDenoiser(model, form, sigmas.dtype), x, sigmas, extra_args=extra_args, callback=callback,
                                   disable=disable, **options)


def vdit_sampler(name: str):
    """ComfyUI's SAMPLER for a vdit_core sampler (SamplerCustom, SamplerCustomAdvanced)."""
    return comfy.samplers.KSAMPLER(VDITSamplerFunction(name))


class DynamicCFGGuider(comfy.samplers.CFGGuider):
    """ComfyUI's CFG guider whose scale follows the family's dynamic guidance (CogVideoX's): a
    function of sigma (ComfyUI's sigma: the family's for the native model) for the number of steps
    in the run's sigmas, made when a run starts (:meth:`Family.guidance_scale` with dynamic)."""

    def __init__(self, model_patcher):
        inner = vdit_model(model_patcher)
        family, schedule = inner.vdit_family, inner.vdit_defaults["schedule"]
        try:
            family.guidance_scale(6.0, 50, schedule, True)
        except ValueError:
            raise ValueError(f"{inner.vdit_name}: {family.label} has no dynamic guidance (CogVideoX has); use CFGGuider") from None
        super().__init__(model_patcher)
        self.vdit_schedule = None  # the scale as a function of sigma, for the run under way

    def sample(self, noise, latent_image, sampler, sigmas, *args, **kwargs):
        inner = vdit_model(self.model_patcher)
        steps = max(1, sigmas.shape[-1] - 1)
        if self.cfg > 1.0:  # (as vdit_core's pipeline: cfg 1 or less is no guidance, dynamic or not)
            self.vdit_schedule = inner.vdit_family.guidance_scale(self.cfg, steps, inner.vdit_defaults["schedule"], True)
        try:
            return super().sample(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.vdit_schedule = None

    def guidance(self, sigma: torch.Tensor) -> float:
        """The scale at a sigma [B] of the run under way (the constant cfg outside a run)."""
        return self.cfg if self.vdit_schedule is None else float(self.vdit_schedule(sigma))

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative", None), self.conds.get("positive", None),
                                                self.guidance(timestep), model_options=model_options, seed=seed)


class StepCacheRun:
    """OUTER_SAMPLE wrapper: each sampling run gets its own :class:`StepCache` on the transformer
    (``transformer.step_cache``, as :meth:`Pipeline.run` sets it), cleared when the run ends; the
    counts go to the log and stay readable (``last``)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.last: StepCache | None = None  # the last run's cache (computed / skipped transformer calls)

    def __call__(self, executor, *args, **kwargs):
        transformer = vdit_model(executor.class_obj.model_patcher).diffusion_model.transformer
        cache = transformer.step_cache = StepCache(self.threshold)
        try:
            return executor(*args, **kwargs)
        finally:
            transformer.step_cache = None
            self.last = cache
            total = cache.computed + cache.skipped
            logging.info("vdit step cache %g: %d of %d transformer calls skipped", self.threshold, cache.skipped, total)


STEP_CACHE_KEY = "vdit_step_cache"


def with_step_cache(model, threshold: float):
    """A clone of the MODEL whose runs use the step cache at ``threshold`` (0: without; a step
    cache it had is replaced)."""
    vdit_model(model)
    check_request(step_cache=threshold)
    out = model.clone()
    out.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, STEP_CACHE_KEY)
    if threshold > 0:
        out.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, STEP_CACHE_KEY, StepCacheRun(threshold))
    return out


def step_cache_run(model) -> StepCacheRun | None:
    """The step cache wrapper of a MODEL from :func:`with_step_cache` (None: it has none)."""
    runs = model.wrappers.get(pe.WrappersMP.OUTER_SAMPLE, {}).get(STEP_CACHE_KEY, [])
    return runs[-1] if runs else None


# ----------------------------------------------------------------------------------------------
# LoRA through ComfyUI's LoRA loading

# (the suffixes of ComfyUI's LoRA format, comfy/weight_adapter/lora.py, and its weight differences)
UP_SUFFIXES = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_B",
               ".lora_linear_layer.up.weight", ".lora_B.default.weight", ".diff", ".diff_b")  # rows: output rows
DOWN_SUFFIXES = (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_A",
                 ".lora_linear_layer.down.weight", ".lora_A.default.weight", ".alpha")  # shared by every row


def weight_key(module: str) -> str:
    """The model state-dict key of a transformer module's weight."""
    return f"diffusion_model.transformer.{module}.weight"


class InStoredUnits:
    """A weight patch's function for a float8 layer (vdit_core.fp8.FP8Linear), which stores
    ``weight / scale``: the patch divided by the scale too. ComfyUI then rounds the sum to float8
    (stochastically) and the layer's scale multiplies it back."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, diff: torch.Tensor) -> torch.Tensor:
        return diff / self.scale


def patch_target(module: str, linear: torch.nn.Module):
    """A key-map value for one of our Linears: its weight's key, or for a float8 layer
    ``(key, no slice, InStoredUnits)``."""
    scale = getattr(linear, "scale_weight", None)
    if scale is None or not is_fp8(linear.weight):
        return weight_key(module)
    return (weight_key(module), None, InStoredUnits(float(scale)))


class RowSplit(tuple):
    """A key-map value for a file's module that feeds several of ours, row by row:
    ``((patch target, first row, rows), ...)``. :func:`lora_inputs` splits its matrices."""

    vdit_row_split = True  # (read by attribute: this module may be imported twice)


class LoRAKeyMap(dict):
    """ComfyUI's LoRA key map of a vdit model, which also knows the model (a label for messages)
    and its Linear weights' shapes (to refuse a LoRA of another size)."""

    def __init__(self, entries: dict, label: str, shapes: dict[str, tuple[int, ...]]):
        super().__init__(entries)
        self.vdit_label, self.vdit_shapes = label, shapes


def split_rows(lora: dict, key_map: dict) -> tuple[dict, dict]:
    """The LoRA with each module that a :class:`RowSplit` maps cut into one module per target
    (``<name>[first:last]``: its up matrix's rows, its down matrix and alpha shared), and the key
    map naming those: ComfyUI patches one weight per file module."""
    splits = {name: v for name, v in key_map.items() if getattr(v, "vdit_row_split", False)}
    if not splits:
        return lora, key_map
    lora, key_map = dict(lora), copy.copy(key_map)
    for name, parts in splits.items():
        del key_map[name]
        keys = {name + s: s for s in UP_SUFFIXES + DOWN_SUFFIXES if name + s in lora}
        if not keys:
            continue
        others = [k for k in lora if k.startswith((name + ".", name + "_lora.")) and k not in keys]
        rows = sum(n for _, _, n in parts)
        bad = [k for k, s in keys.items() if s in UP_SUFFIXES and lora[k].shape[0] != rows]
        if others or bad:  # left whole: ComfyUI reports its keys as not loaded
            logging.warning("vdit: LoRA module %s left out: %s", name,
                            f"{others[0]} cannot be split by rows" if others else f"{bad[0]} has {lora[bad[0]].shape[0]} rows, not {rows}")
            continue
        for key, first, n in parts:
            part = f"{name}[{first}:{first + n}]"
            for k, suffix in keys.items():
                lora[part + suffix] = lora[k][first : first + n] if suffix in UP_SUFFIXES else lora[k]
            key_map[part] = key
        for k in keys:
            del lora[k]
    return lora, key_map


def refuse_misfits(lora: dict, key_map: "LoRAKeyMap", log: bool) -> "LoRAKeyMap":
    """The key map without the file's modules whose matrices do not fit our weights (a LoRA of
    another size); with ``log``, one warning naming what of the file this model lacks."""
    modules = lora_modules_of(lora)
    wrong = {}  # file module -> its shape and the model's
    for name, parts in modules.items():
        target = key_map.get(name)
        shape = key_map.vdit_shapes.get(target[0] if isinstance(target, tuple) else target)
        a, b = parts.get("A"), parts.get("B")
        if shape is not None and a is not None and b is not None and (a.ndim != 2 or b.ndim != 2 or a.shape[1] != shape[1] or b.shape[0] != shape[0]):
            wrong[name] = f"{name}: {b.shape[0]}x{a.shape[-1]}, the model's {shape[0]}x{shape[1]}"
    if wrong:
        key_map = copy.copy(key_map)
        for name in wrong:
            del key_map[name]
    missing = [name for name in modules if name not in key_map and name not in wrong]
    if log and (missing or wrong):
        problems = []
        if missing:
            problems.append(f"{len(missing)} are not in this {key_map.vdit_label} (e.g. {', '.join(missing[:3])})")
        if wrong:
            problems.append(f"{len(wrong)} have other shapes (e.g. {next(iter(wrong.values()))})")
        logging.warning("vdit: a LoRA for another model? Of its %d modules, %s; they are not applied", len(modules), " and ".join(problems))
    return key_map


def lora_inputs(lora: dict, key_map: dict, log: bool = True) -> tuple[dict, dict]:
    """What ComfyUI's ``load_lora`` is given for a vdit model: fused modules split by rows, then
    (for a vdit key map) modules that do not fit left out and reported."""
    lora, key_map = split_rows(lora, key_map)
    if getattr(key_map, "vdit_shapes", None) is not None:
        key_map = refuse_misfits(lora, key_map, log)
    return lora, key_map


def install_lora_support() -> None:
    """Wrap ComfyUI's ``comfy.lora.model_lora_keys_unet`` (a vdit model adds its names) and
    ``comfy.lora.load_lora`` (:func:`lora_inputs`), once per process. ComfyUI's callers
    (``comfy.sd.load_lora_for_models``, its bypass variant, ``comfy.hooks``) look both up in the
    module when called; every other model passes through unchanged."""
    if getattr(comfy.lora.load_lora, "vdit_wrapped", False):
        return
    keys, load = comfy.lora.model_lora_keys_unet, comfy.lora.load_lora

    @functools.wraps(keys)
    def model_lora_keys_unet(model, *args, **kwargs):
        extend = getattr(model, "vdit_lora_key_map", None)
        if extend is None:
            return keys(model, *args, **kwargs)
        if not args and "key_map" not in kwargs:
            args = ({},)  # (not ComfyUI's shared default dict: it would keep our names for other models)
        return extend(keys(model, *args, **kwargs))

    @functools.wraps(load)
    def load_lora(lora, to_load, *args, **kwargs):
        log = kwargs.get("log_missing", args[0] if args else True)
        lora, to_load = lora_inputs(lora, to_load, log)
        return load(lora, to_load, *args, **kwargs)

    model_lora_keys_unet.vdit_wrapped = load_lora.vdit_wrapped = True
    comfy.lora.model_lora_keys_unet, comfy.lora.load_lora = model_lora_keys_unet, load_lora


install_lora_support()


# ----------------------------------------------------------------------------------------------
# conditioning


def with_inputs(conditioning: list, inputs: dict[str, torch.Tensor]) -> list:
    """CONDITIONING with more of the family's inputs (image latents, held frames) in each entry."""
    return [[t, {**d, **{PREFIX + k: v for k, v in inputs.items()}}] for t, d in conditioning]


def conditioning(family, cond: dict[str, torch.Tensor]) -> list:
    """A family's encoded prompt as ComfyUI CONDITIONING (``vdit_family`` names the family it was
    encoded for: a model of another family refuses it)."""
    main = cond[family.text_state]
    return [[main, {**{PREFIX + k: v for k, v in cond.items() if k != family.text_state}, FAMILY_KEY: family.name}]]


# ----------------------------------------------------------------------------------------------
# the VAE


class VAEStage(torch.nn.Module):
    """The first stage ComfyUI's VAE calls: raw latents in and out, the vdit VAE inside
    (pixels [B, 3, F, H, W] in [-1, 1])."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        shift, scale = vae.latent_scaling()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1, 1), persistent=False)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        problem = self.vae.frames_problem(pixels.shape[2])
        if problem:
            raise ValueError(problem)
        s = self.vae.spatial_compression
        tiling = self.vae.auto_tiling(pixels.shape[2], pixels.shape[3] // s * s, pixels.shape[4] // s * s)
        z = self.vae.encode(pixels, tiling=tiling).float()
        return z / self.scale.to(z.device) + self.shift.to(z.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() - self.shift.to(latents.device)) * self.scale.to(latents.device)
        s = self.vae.spatial_compression
        frames, h, w = self.vae.pixel_frames(z.shape[2]), z.shape[3] * s, z.shape[4] * s
        bar = comfy.utils.ProgressBar(100)

        def progress(done: int, total: int) -> None:  # after each chunk: a cancel stops here
            mm.throw_exception_if_processing_interrupted()
            bar.update_absolute(done * 100 // total, 100)

        return self.vae.decode(z.to(self.vae.dtype), tiling=self.vae.auto_tiling(frames, h, w), progress=progress)


class VDITVAE(comfy.sd.VAE):
    """ComfyUI's VAE around a vdit VAE (VAEDecode, VAEDecodeTiled and VAEEncode take it).
    ``size_multiple``: the pixel multiple its model's sizes take (HunyuanDiT: 16); VAE Encode
    centre-crops images to it, as ComfyUI crops to the VAE's own ratio."""

    def __init__(self, vae, size_multiple: int | None = None):
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # ComfyUI warns of the missing weights it is given: ours come below
        try:
            super().__init__(sd={})
        finally:
            logging.disable(previous)
        self.first_stage_model = VAEStage(vae).eval()
        t, s = vae.temporal_compression, vae.spatial_compression
        self.latent_channels, self.latent_dim, self.output_channels = vae.latent_channels, 3, 3
        self.downscale_ratio = (lambda f: max(0, vae.latent_frames(f)), s, s)
        self.upscale_ratio = (lambda n: max(0, vae.pixel_frames(n)), s, s)
        self.downscale_index_formula = self.upscale_index_formula = (t, s, s)
        self.working_dtypes = [torch.bfloat16, torch.float32]
        self.memory_used_decode = lambda shape, dtype: vae.decode_bytes(vae.pixel_frames(shape[2]), shape[3] * s, shape[4] * s)
        self.memory_used_encode = lambda shape, dtype: vae.decode_bytes(shape[2], shape[3], shape[4])
        self.disable_offload = True  # loaded whole: its layers are plain torch ones, which ComfyUI cannot stream
        self.device, self.vae_dtype = mm.vae_device(), vae.dtype
        self.output_device = mm.intermediate_device()
        self.patcher = patcher_class()(self.first_stage_model, load_device=self.device, offload_device=mm.vae_offload_device())
        self.size_multiple = size_multiple or s

    def vae_encode_crop_pixels(self, pixels):
        # pixels [..., H, W, C]: the centre, in whole multiples of the model's size step
        m = self.size_multiple
        for dim in (-3, -2):
            n = pixels.shape[dim]
            if n % m:
                pixels = pixels.narrow(pixels.ndim + dim, (n % m) // 2, n // m * m)
        return pixels


def native_vae(vae, size_multiple: int | None = None) -> VDITVAE:
    """A loaded vdit VAE as a ComfyUI VAE (``size_multiple``: its model family's size step)."""
    return VDITVAE(vae, size_multiple)


def vdit_vae(vae, what: str = "vae"):
    """The vdit VAE inside a ComfyUI VAE, or a one-line refusal naming what it is instead."""
    if not isinstance(vae, VDITVAE):
        raise ValueError(f"{what}: {type(vae).__name__} is not a vdit VAE; connect VDIT Load VAE (the model's own VAE)")
    return vae.first_stage_model.vae


def encode_scaled(vae: VDITVAE, pixels: torch.Tensor, scale) -> torch.Tensor:
    """Posterior means of pixels [B, 3, F, H, W] in [-1, 1], times ``scale(vae_info)`` (the
    family's scaling of conditioning frames), on ComfyUI's intermediate device. The VAE is loaded
    through ComfyUI's model management."""
    inner = vdit_vae(vae)
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_encode(pixels.shape, vae.vae_dtype))
    with torch.no_grad():
        z = inner.encode(pixels.to(vae.device, inner.dtype), scale=scale(inner.info()))
    return z.float().to(mm.intermediate_device())


def resized(images: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] scaled to cover width x height and centre-cropped (ComfyUI's own resize)."""
    if images.shape[1:3] == (height, width):
        return images
    return comfy.utils.common_upscale(images.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
