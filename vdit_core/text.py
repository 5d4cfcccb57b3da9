"""Text encoders through ``transformers``.

CogVideoX and Open-Sora condition on the T5-v1.1 encoder's last hidden states: the prompt is
tokenised to a fixed length (226 for CogVideoX, 300 for Open-Sora) and padded; CogVideoX encodes
without an attention mask, Open-Sora with it and passes the mask on, exactly as the releases do.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from . import fp8
from .checkpoint import CheckpointError, assign_state_dict, build_on_meta, describe, load_state_dict, read_json


class T5TextEncoder:
    """A T5 encoder and its tokenizer: ``encode(prompts) -> [B, max_length, d_model]``."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def to(self, device=None, dtype=None) -> "T5TextEncoder":
        self.model.to(device=device, dtype=dtype)
        keep_fp32_modules(self.model)
        return self

    def tokenize(self, prompts: str | list[str], with_mask: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, max_length] (padded, truncated); ``with_mask``: also the attention mask."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        enc = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=with_mask,
            return_tensors="pt",
        )
        return (enc.input_ids, enc.attention_mask) if with_mask else enc.input_ids

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Embeddings [B, max_length, d_model] in the encoder's dtype, on its device."""
        ids = self.tokenize(prompts).to(self.device)
        return self.model(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def encode_with_mask(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings [B, max_length, d_model] computed with the attention mask (padding not
        attended, as Open-Sora encodes), and that mask [B, max_length] (int64)."""
        ids, mask = self.tokenize(prompts, with_mask=True)
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state, mask


def _t5_config_from_weights(sd: dict[str, torch.Tensor]):
    from transformers import T5Config

    try:
        vocab, d_model = sd["shared.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
        rel = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        heads = rel.shape[1]
        inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
        wi = sd["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"]
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a T5 encoder state dict (missing {e})") from None
    return T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=wi.shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=rel.shape[0],
        feed_forward_proj="gated-gelu" if gated else "relu",
        is_encoder_decoder=False,
        use_cache=False,
    )


FP32_MODULES = ("wo",)  # transformers' T5 ``_keep_in_fp32_modules``, when its class does not say


def keep_fp32_modules(model: nn.Module) -> nn.Module:
    """A float16 T5 / mT5 with its feed-forward output layers (``wo``) in float32, as transformers
    loads one: their products exceed float16's range (65504) in the released weights, and T5
    would clamp them (or give NaN). T5's forward casts the activations to ``wo``'s dtype, the
    residual stream then stays float32 and each layer norm casts back to float16."""
    if model.get_input_embeddings().weight.dtype != torch.float16:
        return model
    names = set(getattr(model, "_keep_in_fp32_modules", None) or FP32_MODULES)
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in names:
            module.float()
    return model


def _compute_dtype(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a T5 computes in: the one asked for, else the token embedding's; float8 files
    (ComfyUI's ``t5xxl_fp8_e4m3fn``) compute in bfloat16 unless told otherwise (T5's layers
    run in their weights' dtype, which cannot be float8)."""
    if dtype is not None:
        return dtype
    emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
    if emb is not None and emb.is_floating_point() and not fp8.is_fp8(emb):
        return emb.dtype
    return torch.bfloat16 if fp8.holds_fp8(sd) else torch.float32


def _upcast_fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> dict[str, torch.Tensor]:
    """float8 weights (plain casts, or ComfyUI's scaled fp8 with ``scale_weight``) dequantised
    to ``dtype``: T5's layers compute in their weights' dtype."""
    if not fp8.holds_fp8(sd):
        return sd
    warnings.warn(f"{source}: float8 text encoder weights are upcast to {str(dtype).removeprefix('torch.')} "
                  "(T5 cannot compute in float8); this takes twice their memory", stacklevel=3)
    return fp8.adopt(nn.Module(), sd, dtype)  # a model without linear layers: every float8 tensor dequantised


def load_t5_model(path: str | Path, dtype: torch.dtype | None = torch.float32, device="cpu", state_dict: dict | None = None):
    """A ``T5EncoderModel`` (also mT5) from a transformers folder (config.json + weights), a single
    safetensors file with transformers key names (as ComfyUI users keep in models/text_encoders),
    or ``state_dict``: the encoder's part of a combined checkpoint at ``path``.

    ``dtype`` None keeps the file's (its token embedding's); every weight is then in that dtype,
    except that float8 files compute in bfloat16 and a float16 model keeps ``wo`` in float32
    (:func:`keep_fp32_modules`)."""
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    sd = load_state_dict(path, dtype=dtype, device=device) if state_dict is None else state_dict
    sd = {k: v for k, v in sd.items() if not k.startswith("decoder.") and k != "lm_head.weight"}  # full T5 files
    dtype = _compute_dtype(sd, dtype)
    sd = _upcast_fp8(sd, dtype, str(path))
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}  # one dtype (files may mix)
    if "shared.weight" not in sd and "encoder.embed_tokens.weight" in sd:
        sd["shared.weight"] = sd["encoder.embed_tokens.weight"]
    sd.setdefault("encoder.embed_tokens.weight", sd.get("shared.weight"))
    if sd["encoder.embed_tokens.weight"] is None:
        raise CheckpointError(f"{path}: no token embedding (shared.weight) found; is this a T5 encoder?")
    if path.is_dir() and (path / "config.json").exists():
        config = T5Config.from_dict(read_json(path / "config.json"))
    else:
        config = _t5_config_from_weights(sd)
    model = build_on_meta(lambda: T5EncoderModel(config))
    assign_state_dict(model, sd, str(path), "a T5 encoder")
    model.encoder.embed_tokens = model.shared  # tied, as in transformers
    return keep_fp32_modules(model.to(device)).eval().requires_grad_(False)


def _has_protobuf() -> bool:
    try:
        import google.protobuf  # noqa: F401
    except ImportError:
        return False
    return True


def load_tokenizer(path: str | Path):
    """A T5 tokenizer from a folder holding spiece.model and/or tokenizer.json (the official
    CogVideoX folder has spiece.model; ComfyUI's t5_tokenizer folder has tokenizer.json)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds of errors for unusable folders
        if (path / "spiece.model").is_file() and not (path / "tokenizer.json").is_file() and not _has_protobuf():
            # without protobuf transformers 5 falls through to a tiktoken reader and names tiktoken
            raise CheckpointError(
                f"{path}: reading spiece.model needs the protobuf package, which is not installed "
                "(pip install protobuf; it is in vdit's requirements.txt)"
            ) from None
        raise CheckpointError(f"{path}: no usable tokenizer ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_t5(
    text_encoder: str | Path,
    tokenizer: str | Path,
    dtype: torch.dtype | None = torch.float32,
    device="cpu",
    *,
    max_length: int,
) -> T5TextEncoder:
    """T5 encoder weights (folder or single file) + tokenizer folder -> :class:`T5TextEncoder` of
    ``max_length`` tokens per prompt (the family's: ``families.get(name).text_length``)."""
    return T5TextEncoder(load_t5_model(text_encoder, dtype, device), load_tokenizer(tokenizer), max_length)


def load_t5_encoder(path: Path, dtype, device, tokenizer: Path | None, length: int):
    """A T5 encoder of ``length`` tokens from a model folder (``tokenizer`` None: its
    ``text_encoder/`` and ``tokenizer/``) or a weight file + tokenizer folder (a folder of
    tokenizers, ComfyUI's, gives its ``t5_tokenizer``)."""
    path = Path(path)
    if tokenizer is None:
        return load_t5(path / "text_encoder", path / "tokenizer", dtype=dtype, device=device, max_length=length)
    if (Path(tokenizer) / "t5_tokenizer").is_dir():
        tokenizer = Path(tokenizer) / "t5_tokenizer"
    return load_t5(path, tokenizer, dtype=dtype, device=device, max_length=length)


# ----------------------------------------------------------------------------------------------
# HunyuanDiT: a bilingual CLIP (a BERT) and mT5, each with its attention mask


def _tokenize(tokenizer, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_attention_mask=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


class HunyuanTextEncoders(nn.ModuleDict):
    """HunyuanDiT's CLIP and mT5 as one module, under a name ComfyUI's memory log can show
    ("Requested to load HunyuanTextEncoders", not "ModuleDict")."""


class DualTextEncoder:
    """HunyuanDiT's two text encoders: ``encode(prompts)`` -> {``context`` [B, 77, 1024],
    ``context_mask``, ``context_t5`` [B, 256, 2048], ``context_t5_mask``}; each encoder runs with
    its attention mask, as the release does."""

    def __init__(self, clip, clip_tokenizer, t5, t5_tokenizer, clip_length: int = 77, t5_length: int = 256):
        self.model = HunyuanTextEncoders({"clip": clip.eval().requires_grad_(False), "t5": t5.eval().requires_grad_(False)})
        self.tokenizers = (clip_tokenizer, t5_tokenizer)
        self.lengths = (clip_length, t5_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype=None) -> "DualTextEncoder":
        self.model.to(device=device, dtype=dtype)
        keep_fp32_modules(self.model["t5"])
        return self

    @torch.no_grad()
    def encode(self, prompts: str | list[str]) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        out = {}
        for key, model, tok, length in (("context", self.model["clip"], self.tokenizers[0], self.lengths[0]),
                                        ("context_t5", self.model["t5"], self.tokenizers[1], self.lengths[1])):
            ids, mask = _tokenize(tok, prompts, length)
            ids, mask = ids.to(self.device), mask.to(self.device)
            out[key] = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[key + "_mask"] = mask
        return out


def _bert_config_from_weights(sd: dict[str, torch.Tensor]):
    from transformers import BertConfig

    try:
        vocab, hidden = sd["embeddings.word_embeddings.weight"].shape
        layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
        return BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          intermediate_size=sd["encoder.layer.0.intermediate.dense.weight"].shape[0],
                          max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
                          type_vocab_size=sd["embeddings.token_type_embeddings.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a BERT encoder (missing {e})") from None


def load_bert(path: str | Path, dtype: torch.dtype = torch.float32, device="cpu", state_dict: dict | None = None):
    """A ``BertModel`` (HunyuanDiT's bilingual CLIP text tower) from a transformers folder, or
    from ``state_dict`` (a checkpoint's part; the config is read off the weights, heads of 64)."""
    from transformers import BertConfig, BertModel

    path = Path(path)
    if state_dict is None and not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: expected a BERT text encoder folder (config.json + weights)")
    sd = load_state_dict(path, dtype=dtype) if state_dict is None else state_dict
    sd = {k.removeprefix("bert."): v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    config = BertConfig.from_dict(read_json(path / "config.json")) if state_dict is None else _bert_config_from_weights(sd)
    model = BertModel(config, add_pooling_layer="pooler.dense.weight" in sd)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing:
        raise CheckpointError(f"{path}: expected a BERT text encoder, but this looks like {describe(sd.keys())}: {len(missing)} missing (e.g. {missing[:3]})")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


CHECKPOINT_CLIP, CHECKPOINT_T5 = "text_encoders.hydit_clip.transformer.", "text_encoders.mt5xl.transformer."
CHECKPOINT_SPIECE = "text_encoders.mt5xl.spiece_model"  # the mT5 tokenizer, embedded as bytes


def load_dual_checkpoint(path: str | Path, bert_tokenizer: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> DualTextEncoder:
    """HunyuanDiT's text encoders from ComfyUI's single-file checkpoint (BERT and mT5 weights, the
    mT5 tokenizer embedded); the BERT tokenizer from ``bert_tokenizer`` (a folder with vocab.txt:
    ComfyUI's ``hydit_clip_tokenizer``)."""
    import tempfile

    from .checkpoint import read_part

    path = Path(path)
    clip, t5 = read_part(path, (CHECKPOINT_CLIP,), dtype, device), read_part(path, (CHECKPOINT_T5,), dtype, device)
    if clip is None or t5 is None:
        raise CheckpointError(f"{path}: expected HunyuanDiT's text encoders ({CHECKPOINT_CLIP}*, {CHECKPOINT_T5}*), "
                              f"found {'neither' if clip is None and t5 is None else 'only one'}")
    spiece = read_part(path, (CHECKPOINT_SPIECE,))
    if not spiece:
        raise CheckpointError(f"{path}: has no embedded mT5 tokenizer ({CHECKPOINT_SPIECE})")
    with tempfile.TemporaryDirectory() as tmp:  # a tokenizer folder as transformers reads one (it keeps nothing open)
        (Path(tmp) / "spiece.model").write_bytes(bytes(next(iter(spiece.values())).to(torch.uint8).tolist()))
        (Path(tmp) / "tokenizer_config.json").write_text('{"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "legacy": true}')
        t5_tokenizer = load_tokenizer(tmp)
    return DualTextEncoder(load_bert(path, dtype, device, state_dict=clip), load_tokenizer(bert_tokenizer),
                           load_t5_model(path, dtype, device, state_dict=t5), t5_tokenizer)


def load_dual(folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> DualTextEncoder:
    """HunyuanDiT's text encoders from a diffusers folder: ``text_encoder/`` + ``tokenizer/`` (the
    BERT) and ``text_encoder_2/`` + ``tokenizer_2/`` (mT5)."""
    folder = Path(folder)
    return DualTextEncoder(
        load_bert(folder / "text_encoder", dtype, device), load_tokenizer(folder / "tokenizer"),
        load_t5_model(folder / "text_encoder_2", dtype, device), load_tokenizer(folder / "tokenizer_2"),
    )
