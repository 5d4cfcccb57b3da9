"""Every usable attention backend against a naive softmax reference, with and without masks."""

import dataclasses
import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vdit_core import attention as A


def reference(q, k, v, valid):
    """Per sample, per head: softmax(q k^T / sqrt(d)) v over the valid keys, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        keys = valid[b].nonzero().flatten()
        for h in range(q.shape[2]):
            qq, kk, vv = q[b, :, h].double(), k[b, keys, h].double(), v[b, keys, h].double()
            w = torch.softmax(qq @ kk.T / q.shape[-1] ** 0.5, dim=-1)
            out[b, :, h] = w @ vv
    return out


def _inputs(seed=0, b=3, sq=7, skv=11, h=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, s, h, d, generator=g) for s in (sq, skv, skv)]


@pytest.mark.parametrize("backend", A.available_backends("cpu", torch.float32))
@pytest.mark.parametrize("masking", ["none", "lens", "prefix_mask", "arbitrary_mask"])
def test_backend_matches_reference(backend, masking):
    q, k, v = _inputs()
    lens = torch.tensor([11, 4, 1])
    valid = torch.ones(3, 11, dtype=torch.bool)
    kw = {}
    if masking == "lens":
        kw["kv_lens"] = lens
        valid = torch.arange(11)[None] < lens[:, None]
    elif masking == "prefix_mask":
        valid = torch.arange(11)[None] < lens[:, None]
        kw["mask"] = valid
    elif masking == "arbitrary_mask":
        valid = torch.rand(3, 11, generator=torch.Generator().manual_seed(1)) > 0.4
        valid[:, 3] = True
        kw["mask"] = valid
    out = A.attention(q, k, v, backend=backend, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert (out.double() - reference(q, k, v, valid)).abs().max() < 1e-5


def test_padded_keys_are_ignored():
    q, k, v = _inputs()
    lens = torch.tensor([5, 5, 5])
    base = A.attention(q, k, v, kv_lens=lens)
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:] = 1e3
    v2[:, 5:] = -1e3
    assert torch.allclose(A.attention(q, k2, v2, kv_lens=lens), base, atol=1e-6)


def test_auto_choice_never_picks_a_backend_that_cannot_run_on_cpu():
    assert A.resolve_backend(None, "cpu", torch.float32) == "sdpa"
    assert A.resolve_backend("auto", "cpu", torch.bfloat16) == "sdpa"
    assert "xformers" not in A.available_backends("cpu", torch.float16)


def test_unavailable_backend_gets_clear_error():
    q, k, v = _inputs()
    for name in ("xformers", "flash_attn", "sageattention"):
        with pytest.raises(A.AttentionBackendError, match=r"not available: .*Usable here: sdpa, math"):
            A.attention(q, k, v, backend=name)
    with pytest.raises(A.AttentionBackendError, match="unknown attention backend"):
        A.attention(q, k, v, backend="fast")


@pytest.mark.skipif(not A._installed("xformers"), reason="xformers not installed")
def test_installed_xformers_falls_back_cleanly():
    # xformers installs on CPU-only machines but its kernels raise there: the CPU check says so,
    # and a CUDA probe that fails (no GPU, or a build for another torch) makes auto use SDPA.
    why = A._probe("xformers", "cpu", torch.float32)
    assert why is not None and "CUDA only" in why
    if not torch.cuda.is_available():
        assert A._probe.__wrapped__("xformers", "cuda", torch.float16) is not None
        assert A.resolve_backend(None, "cuda", torch.float16) == "sdpa"
    q, k, v = _inputs()
    assert torch.allclose(A.attention(q, k, v), A.attention(q, k, v, backend="math"), atol=1e-5)


def test_environment_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv(A.ENV_VAR, "math")
    assert A.resolve_backend(None, "cpu", torch.float32) == "math"
    assert A.resolve_backend("sdpa", "cpu", torch.float32) == "sdpa"  # an argument wins
    monkeypatch.setenv(A.ENV_VAR, "nope")
    with pytest.raises(A.AttentionBackendError):
        A.resolve_backend(None, "cpu", torch.float32)


def test_bad_arguments():
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="at least one valid key"):
        A.attention(q, k, v, kv_lens=torch.tensor([3, 0, 2]))
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        A.attention(q[0], k, v)
    with pytest.raises(ValueError, match="not both"):
        A.attention(q, k, v, kv_lens=torch.tensor([1, 1, 1]), mask=torch.ones(3, 11, dtype=torch.bool))


class _FakeBlockDiagonalMask:
    """xformers' BlockDiagonalMask: query block i attends key block i only."""

    def __init__(self, q_seqlen, kv_seqlen):
        self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)

    @classmethod
    def from_seqlens(cls, q_seqlen, kv_seqlen=None):
        return cls(q_seqlen, kv_seqlen if kv_seqlen is not None else q_seqlen)


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
    """xformers' memory_efficient_attention on [B, S, H, D], by the textbook formula; like the real
    one it refuses q, k, v of different dtypes (the real kernels run on CUDA only)."""
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"Query/Key/Value should all have the same dtype: {q.dtype}, {k.dtype}, {v.dtype}")
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if isinstance(attn_bias, _FakeBlockDiagonalMask):
        allowed = torch.zeros(s.shape[-2:], dtype=torch.bool, device=q.device)
        qs = ks = 0
        for nq, nk in zip(attn_bias.q_seqlen, attn_bias.kv_seqlen):
            allowed[qs : qs + nq, ks : ks + nk] = True
            qs, ks = qs + nq, ks + nk
        s = s.masked_fill(~allowed, -float("inf"))
    elif attn_bias is not None:
        s = s + attn_bias.float()
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v.float()).to(q.dtype)


@pytest.fixture
def fake_xformers(monkeypatch):
    """An installed, working xformers as a CUDA machine has it, for the CPU: vdit's own xformers
    code runs, on top of a textbook memory_efficient_attention."""
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
    pkg = types.ModuleType("xformers")
    pkg.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", pkg)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    probe = A._probe
    monkeypatch.setattr(A, "_probe", lambda backend, device_type, dtype: None if backend == "xformers" else probe(backend, device_type, dtype))


def test_q_k_v_of_mixed_dtypes_reach_the_backend_as_one(fake_xformers):
    """CUDA autocast runs LayerNorm in float32: the qk-normed q and k of every family reach
    attention() float32 while v is bf16, and xformers (auto's choice on CUDA) refuses mixed
    dtypes. attention() brings the three to autocast's dtype (as SDPA does under autocast), and
    outside autocast to the widest."""
    q, k, v = _inputs()
    v = v.bfloat16()
    assert A.compute_dtype(q, k, v) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert A.compute_dtype(q, k, v) == torch.bfloat16
        out = A.attention(q, k, v, backend="xformers")
        lens = A.attention(q, k, v, kv_lens=torch.tensor([11, 4, 1]), backend="xformers")
        sdpa = A.attention(q, k, v, backend="sdpa")
        expected = A.attention(q.bfloat16(), k.bfloat16(), v, backend="math")  # the fake's formula, on bf16 inputs
    assert out.dtype == lens.dtype == sdpa.dtype == torch.bfloat16
    assert torch.equal(out, expected)
    assert (sdpa.float() - expected.float()).abs().max() < 2e-2
    out = A.attention(q, k, v, backend="xformers")  # no autocast: float32, v widened
    assert out.dtype == torch.float32
    assert (out.double() - reference(q, k, v.float(), torch.ones(3, 11, dtype=torch.bool))).abs().max() < 1e-5


_MASKINGS = {  # [B=3, Skv=11] key masks: valid keys first (padded text), and not
    "prefix": torch.arange(11)[None] < torch.tensor([11, 4, 1])[:, None],
    "arbitrary": (torch.rand(3, 11, generator=torch.Generator().manual_seed(1)) > 0.4) | (torch.arange(11) == 3),
}


@pytest.mark.parametrize("masking", list(_MASKINGS))
def test_vdits_xformers_code_matches_the_reference(fake_xformers, masking):
    """The xformers backend's packing of valid keys (block-diagonal mask) and its dense bias,
    never run on a CPU before, give the reference; from a mask tensor and from a KeyMask."""
    q, k, v = _inputs()
    valid = _MASKINGS[masking]
    expected = reference(q, k, v, valid)
    for mask in (valid, A.key_mask(None, valid, 11, "cpu")):
        assert (A.attention(q, k, v, mask=mask, backend="xformers").double() - expected).abs().max() < 1e-5


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's values on the host, each of which makes the
    host wait for the GPU: item / bool / float (``_local_scalar_dense``), ``torch.equal``,
    ``nonzero``, boolean indexing, ``tolist``."""

    READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.READS or (name.startswith("index") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []))):
            self.count += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):  # reads the values in C++ without dispatching an operation
            counter.count += 1
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def test_host_reads_are_counted():
    x = torch.tensor([[True, False], [True, True]])
    with HostReads() as reads:
        bool(x.all()), x.sum(1).tolist(), torch.equal(x, x), torch.ones(2, 2)[:, x[0]], x.nonzero()
    assert reads.count == 5


@pytest.mark.parametrize("masking", list(_MASKINGS))
@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
def test_attention_with_a_key_mask_reads_no_values(fake_xformers, backend, masking):
    """Made once, a KeyMask is all attention needs: with its tensors and q, k, v on the meta
    device (which has no values: reading one raises) every backend runs, and on the CPU it gives
    what the mask tensor gives (which is read at every call)."""
    q, k, v = _inputs()
    valid = _MASKINGS[masking]
    keys = A.key_mask(None, valid, 11, "cpu")
    with HostReads() as reads:
        out = A.attention(q, k, v, mask=keys, backend=backend)
    assert reads.count == 0
    assert torch.equal(out, A.attention(q, k, v, mask=valid, backend=backend))
    meta = dataclasses.replace(keys, **{f.name: getattr(keys, f.name).to("meta") for f in dataclasses.fields(keys)
                                        if isinstance(getattr(keys, f.name), torch.Tensor)})
    out = A.attention(*(t.to("meta") for t in (q, k, v)), mask=meta, backend=backend)
    assert out.shape == q.shape and out.is_meta


def test_padded_keys_are_made_from_the_lengths_alone():
    keys = A.padded_keys(3, 5, 8, "cpu")
    expected = A.key_mask(torch.tensor([5, 5, 5]), None, 8, "cpu")
    assert keys.lens == expected.lens == (5, 5, 5)
    for name in ("mask", "index", "cu_lens"):
        assert torch.equal(getattr(keys, name), getattr(expected, name)), name
    assert A.padded_keys(2, 3, 4, "meta").mask.shape == (2, 4)  # no values read


def test_sequence_parallel_attention_reads_no_values(monkeypatch):
    """Ulysses attention over a sequence padded to split over the ranks masks the padding by
    lengths it knows on the host: no call reads values. Two ranks simulated in one process (the
    other rank holds the same part)."""
    import torch.distributed as dist

    from vdit_core.parallel import SequenceParallel

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "all_to_all_single", lambda recv, send, group=None: recv.copy_(send))
    monkeypatch.setattr(dist, "all_gather", lambda outs, x, group=None: [o.copy_(x) for o in outs])
    sp = SequenceParallel(None)
    for prefix in (0, 3):
        tokens = sp.split(torch.randn(2, 7, 4, 8), 1)  # 7 tokens: 4 on each rank, one of them padding
        q = torch.cat([torch.randn(2, prefix, 4, 8), tokens], dim=1)
        with HostReads() as reads:
            out = sp.attention(q, q, q, prefix=prefix, backend="sdpa")
        assert reads.count == 0 and out.shape == q.shape


def _stdit(depth: int):
    from vdit_core.models import opensora

    torch.manual_seed(0)
    model = opensora.STDiT3(opensora.STDiT3Config(hidden_size=32, depth=depth, num_heads=2, caption_channels=16, model_max_length=9))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def test_open_soras_text_mask_is_read_once_per_forward_not_per_block():
    """Open-Sora's cross-attention (56 blocks in the release) shares one text mask: with masks
    that differ between samples (CFG's two prompts in one batch) the forward reads mask values as
    often with 3 spatial + 3 temporal blocks as with 1 + 1, and gives what attention with the
    mask tensor at every block gives."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 3, 4, 6, generator=g), torch.randn(2, 9, 16, generator=g)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    reads = {}
    for depth in (1, 3):
        model = _stdit(depth)
        with torch.no_grad(), HostReads() as counter:
            out = model(x, torch.tensor([700.0, 700.0]), y, mask=mask, fps=24.0)
        reads[depth] = counter.count
    assert reads[1] == reads[3], reads

    for block in [*model.spatial_blocks, *model.temporal_blocks]:  # the mask tensor at every block: as before
        forward = block.forward
        block.forward = lambda *a, forward=forward: forward(*a[:2], a[2].mask if a[2] is not None else None, *a[3:])
    with torch.no_grad():
        assert torch.equal(model(x, torch.tensor([700.0, 700.0]), y, mask=mask, fps=24.0), out)


def test_open_sora_blocks_with_a_text_mask_compile_without_graph_breaks():
    """Regional compilation compiles each block: with the text mask read inside every block's
    attention, each graph broke there; with the mask made once per forward a whole block is one
    graph (torch.compile's fullgraph=True raises on any break; the eager backend needs no compiler)."""
    model = _stdit(1)
    args = {}
    for block in (model.spatial_blocks[0], model.temporal_blocks[0]):
        block.register_forward_pre_hook(lambda m, a: args.setdefault(m, a))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(torch.randn(2, 4, 3, 4, 6, generator=g), torch.tensor([700.0, 700.0]), torch.randn(2, 9, 16, generator=g),
              mask=torch.tensor([[1] * 9, [1] * 4 + [0] * 5]), fps=24.0)
        for block, a in args.items():
            assert torch.equal(torch.compile(block, backend="eager", fullgraph=True)(*a), block(*a))
    assert len(args) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_in_place_equals_apply_rope_with_gradients(dtype):
    """layers.rotate_ (complex multiply in place, on a slice) gives the rotary embedding's values
    and gradients as its textbook formula, x * cos + rotate_half(x) * sin in float32."""
    from vdit_core.layers import rope_3d, rope_rotations, rotate_

    def apply_rope(x, cos, sin):  # interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
        pairs = x.float().unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (x.float() * cos[None, :, None] + rotated * sin[None, :, None]).to(x.dtype)

    cos, sin = rope_3d(16, 2, 3, 4, "slice", 3, 4)  # 24 positions
    x = torch.randn(2, 30, 3, 16, dtype=dtype, requires_grad=True)  # 6 text tokens, then 24 video tokens
    expected = torch.cat([x[:, :6], apply_rope(x[:, 6:], cos, sin)], dim=1)
    y = x * 1  # a fresh tensor, as q and k are in the models
    rotate_(y[:, 6:], rope_rotations(cos, sin, "cpu"))
    # bfloat16: the float32 results, rounded once (a difference of one unit of the inputs where terms cancel)
    tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1.6e-2}
    torch.testing.assert_close(y, expected, **tol)
    w = torch.randn_like(expected)
    (g_expected,) = torch.autograd.grad((expected.float() * w.float()).sum(), x)
    (g,) = torch.autograd.grad((y.float() * w.float()).sum(), x)
    torch.testing.assert_close(g, g_expected, **tol)
