"""vdit's sampling features for ComfyUI's own sampling nodes (SamplerCustomAdvanced, SamplerCustom,
KSampler): vdit_core's samplers as a SAMPLER, CogVideoX's dynamic CFG as a GUIDER, the step cache
as a MODEL patch. The ComfyUI objects are made in ``native.py`` (imported when a node runs: these
classes import without ComfyUI)."""

from __future__ import annotations

# vdit_core's samplers that ComfyUI lacks or that differ from ComfyUI's of the same name (checked
# against ComfyUI 0.3.64 on the test models): name -> what is different
SAMPLER_CHOICES = {
    "cogvideox_dpm": "CogVideoX's own stochastic DPM-Solver++(2M) (the 5B releases' sampler; ComfyUI has none)",
    "unipc": "diffusers' UniPC (bh2, order 2, last step to sigma 0); ComfyUI's uni_pc_bh2 is order 3 and stops at sigma 0.001",
    "dpmpp_2m": "DPM-Solver++(2M), exact for flow models (Open-Sora): ComfyUI's treats a flow sigma as a VE one",
    "dpmpp_2m_sde": "DPM-Solver++(2M) SDE from sigma 1 of flow models without ComfyUI's offset; vdit's seeded noise (not a Brownian tree)",
    "ddpm": "ancestral DDPM, also for flow models (ComfyUI's assumes a VP model)",
    "euler_ancestral": "ancestral Euler; on flow models the DDPM posterior's noise split (ComfyUI's RF variant splits otherwise)",
}


class VDITSamplerSelect:
    """A vdit_core sampler as ComfyUI's SAMPLER."""

    @classmethod
    def INPUT_TYPES(cls):
        what = "; ".join(f"{name}: {text}" for name, text in SAMPLER_CHOICES.items())
        return {"required": {
            "sampler_name": (list(SAMPLER_CHOICES), {"default": "cogvideox_dpm", "tooltip": f"vdit's samplers that ComfyUI lacks or does differently: {what}. "
                                                     "Stochastic ones draw their noise from the run's seed (the noise node's)"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "select"
    DESCRIPTION = ("vdit's samplers for SamplerCustomAdvanced and SamplerCustom: CogVideoX's DPM-Solver (cogvideox_dpm), diffusers' UniPC, "
                   "and flow-exact DPM-Solver++ / ancestral samplers for Open-Sora; they give what the VDIT Sampler's pipeline gives.")
    CATEGORY = "vdit"

    def select(self, sampler_name):
        from . import native

        if sampler_name not in SAMPLER_CHOICES:
            raise ValueError(f"sampler_name {sampler_name!r}: not one of {', '.join(SAMPLER_CHOICES)}")
        return (native.vdit_sampler(sampler_name),)


class VDITDynamicCFGGuider:
    """ComfyUI's CFG guider with CogVideoX's dynamic guidance scale."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a CogVideoX model (VDIT Load Model); other families have no dynamic guidance"}),
            "positive": ("CONDITIONING", {"tooltip": "the prompt (VDIT Prompt Encode)"}),
            "negative": ("CONDITIONING", {"tooltip": "the negative prompt (VDIT Prompt Encode)"}),
            "cfg": ("FLOAT", {"default": 6.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "the guidance scale the dynamic schedule rises to (1 + cfg * (1 - cos(pi * ((N - t) / N) ** 5)) / 2 at timestep t "
                                         "of N steps, N: the sigmas' steps); 1 or less: no guidance"}),
        }}

    RETURN_TYPES = ("GUIDER",)
    FUNCTION = "get_guider"
    DESCRIPTION = ("CogVideoX's dynamic classifier-free guidance for SamplerCustomAdvanced: the scale follows the release's schedule "
                   "over the run's sigmas (recommended with cogvideox_dpm), as the VDIT Sampler's dynamic_cfg.")
    CATEGORY = "vdit"

    def get_guider(self, model, positive, negative, cfg):
        from . import native

        guider = native.DynamicCFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return (guider,)


class VDITStepCache:
    """The model with vdit_core's step cache on every sampling run."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "a vdit model (VDIT Load Model)"}),
            "threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 1.0, "step": 0.01,
                                    "tooltip": "faster, slightly different: skip the transformer on steps whose input changed by less than this in total, "
                                               "reusing the last computed change (0: off; 0.08-0.1: mild)"}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"
    DESCRIPTION = ("Step cache (TeaCache-style) for KSampler and SamplerCustomAdvanced: the transformer skips steps whose input changed "
                   "little and reuses the last computed change; the log says how many calls each run skipped.")
    CATEGORY = "vdit"

    def patch(self, model, threshold):
        from . import native

        return (native.with_step_cache(model, threshold),)
