"""Decode kernel v3 (1..16 tokens): CUDA C++ (``lut_cuda.cu``) behind a ctypes call.

Why CUDA and not Triton: see benchmarks/notes-kernels.md. In short, a per-channel codebook lookup
in Triton costs a 64-bit pointer per weight plus bit-plane unpacking (~15 instructions/weight);
here a weight costs 4 (SHF, LOP3, LDS with a 32-bit address, FADD), which fits the H200's budget
at the byte floor.

- ``repack(layer)``: one-time, cached on the layer as ``_cuda_layout`` (rebuilt when a buffer
  changes, never saved): each b-bit group's indices in contiguous b-bit fields, 32//b per int32
  word, words grouped by 4 per row ("quads"), stored ``[quad, out, 4]``; fp16 outlier columns
  transposed; sparse corrections ``sparse_val - W_q`` (fp32).
- ``library()``: compiles ``lut_cuda.cu`` with ``nvcc`` once per machine (about 10 s; cached in
  ``$CMPQ_CACHE`` or ``~/.cache/cmpq``), loads it with ctypes. Unavailable (no nvcc, build error)
  -> ``available()`` is False and decode falls back to the Triton kernel.
- ``decode(layer, x)``: one launch; works inside CUDA graphs (the launch goes to the current
  stream; the workspace is a per-device pool that is never freed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch

from cmpq.kernels.layout import _key, _quantized_values

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lut_cuda.cu")
NTHREADS = 256
KPAD = {2: 16, 3: 16, 4: 8}
NT_CHOICES = (1, 4, 8, 16)
SMEM_TARGET = 48 << 10
MAX_SMEM = 200 << 10  # the kernel's dynamic shared-memory limit (cudaFuncSetAttribute)
BLOCKS_PER_SM = 6
# Which kernel serves one-token decode: "v3b" (this file's lut_cuda.cu) or "v4s" (kernel_v4.py),
# or "auto": v4s up to AUTO_V4S_MAX_WEIGHTS
# weights, v3b above. Measured on the H200 2026-11-30 (benchmarks/results/kernel-variants-h200.md,
# 3 bits, 1 token): v4s wins on 4096x4096 .. 8192x8192 (11.1 vs 17.1 us, 18.7 vs 24.0, 24.8 vs
# 30.0), v3b on the 70B MLP shapes (66-68 vs 70-73 us). Env CMPQ_DECODE_VARIANT overrides.
DEFAULT_VARIANT = "auto"
AUTO_V4S_MAX_WEIGHTS = 100_000_000
VARIANTS = ("auto", "v3b", "v4s")

_LIB = None
_LIB_ERR: str | None = None


class _Grp(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("cb", ctypes.c_void_p), ("ch", ctypes.c_void_p),
                ("n", ctypes.c_int), ("nq", ctypes.c_int), ("bits", ctypes.c_int),
                ("smem_off", ctypes.c_int), ("xs_off", ctypes.c_int), ("pad_", ctypes.c_int)]


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in
                ("x", "y", "part", "cnt", "och", "owt", "crow", "scol", "corr", "bias")] + [
                ("g", _Grp * 3)] + [(n, ctypes.c_int) for n in
                ("ldx", "T", "out", "n_act", "S", "is_bf16", "ngroups", "pad_")]


def _build(src_path: str = SRC) -> str:
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if not os.path.exists(nvcc):
        raise RuntimeError("nvcc not found")
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}" + ("a" if (major, minor) == (9, 0) else "")
    src = open(src_path, "rb").read()
    tag = hashlib.sha1(src + arch.encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(src_path))[0]
    cache = os.environ.get("CMPQ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cmpq"))
    os.makedirs(cache, exist_ok=True)
    so = os.path.join(cache, f"{stem}-{tag}.so")
    if not os.path.exists(so):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [nvcc, "-O3", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-o", tmp, src_path]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            os.unlink(tmp)
            raise RuntimeError(f"nvcc failed: {r.stderr[-2000:]}")
        os.replace(tmp, so)
    return so


class KernelLibrary:
    """One of the other kernel files (kernel_v4.cu, kernel_mma.cu), built with ``_build`` and loaded
    on first use. Each exports ``<prefix>_launch(params*, int x n_int_args, stream)``,
    ``<prefix>_error_string`` and ``<prefix>_params_size`` (checked against the ctypes struct, so a
    stale build cannot read a different layout). ``get()`` is None when unavailable; ``error`` says why.
    """

    def __init__(self, src: str, prefix: str, params: type, n_int_args: int) -> None:
        self.src, self.prefix, self.params, self.n_int_args = src, prefix, params, n_int_args
        self.lib: ctypes.CDLL | None = None
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if self.lib is None and self.error is None:
            try:
                lib = ctypes.CDLL(_build(self.src))
                launch = getattr(lib, f"{self.prefix}_launch")
                launch.restype = ctypes.c_int
                launch.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * self.n_int_args + [ctypes.c_void_p]
                getattr(lib, f"{self.prefix}_error_string").restype = ctypes.c_char_p
                if getattr(lib, f"{self.prefix}_params_size")() != ctypes.sizeof(self.params):
                    raise RuntimeError(f"{self.prefix}: params struct size differs between C and ctypes")
                self.lib = lib
            except Exception as e:  # no nvcc, no CUDA, compile error: callers fall back
                self.error = f"{type(e).__name__}: {e}"
        return self.lib


def library():
    """The compiled kernel library (ctypes), or None (reason in ``library_error()``)."""
    global _LIB, _LIB_ERR
    if _LIB is None and _LIB_ERR is None:
        if os.environ.get("CMPQ_CUDA_KERNEL", "1") == "0":
            _LIB_ERR = "disabled by CMPQ_CUDA_KERNEL=0"
            return None
        try:
            lib = ctypes.CDLL(_build())
            lib.cmpq_lut_launch.restype = ctypes.c_int
            lib.cmpq_lut_launch.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_void_p]
            lib.cmpq_error_string.restype = ctypes.c_char_p
            if lib.cmpq_params_size() != ctypes.sizeof(_Params):
                raise RuntimeError("Params struct size mismatch between C and ctypes")
            _LIB = lib
        except Exception as e:  # no nvcc, no CUDA, compile error: fall back to Triton
            _LIB_ERR = f"{type(e).__name__}: {e}"
    return _LIB


def library_error() -> str | None:
    return _LIB_ERR


def available() -> bool:
    return torch.cuda.is_available() and library() is not None


# -- layout ----------------------------------------------------------------------------------------
def repack_group(layer, bits: int, rows_per_step: int = 2048) -> torch.Tensor:
    """The layer's b-bit group (stored bit planes) -> contiguous fields ``[nq, out, 4]`` int32 (see module doc)."""
    pk, n, out = layer.group(bits)[1], layer.group(bits)[0].numel(), layer.out_features
    K = 32 // bits
    nq = -(-n // (4 * K))
    res = torch.empty(nq, out, 4, dtype=torch.int32, device=pk.device)
    shifts = (torch.arange(K, device=pk.device, dtype=torch.int64) * bits)
    for r0 in range(0, out, rows_per_step):
        r1 = min(out, r0 + rows_per_step)
        idx = layer.group_indices(bits, r0, r1)  # int64 [rows, n]
        pad = torch.zeros(r1 - r0, nq * 4 * K, dtype=torch.int64, device=pk.device)
        pad[:, :n] = idx
        words = (pad.view(r1 - r0, nq, 4, K) << shifts).sum(-1)  # < 2**32
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        res[:, r0:r1] = words.permute(1, 0, 2)
    return res


def unrepack_group(q: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of ``repack_group`` (tests): int64 ``[out, n]``."""
    K = 32 // bits
    nq, out, _ = q.shape
    w = q.permute(1, 0, 2).to(torch.int64) & 0xFFFFFFFF  # [out, nq, 4]
    shifts = torch.arange(K, device=q.device, dtype=torch.int64) * bits
    idx = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [out, nq, 4, K]
    return idx.reshape(out, nq * 4 * K)[:, :n]


@dataclass
class CudaGroup:
    bits: int
    n: int
    nq: int
    q: torch.Tensor
    codebook: torch.Tensor
    channels: torch.Tensor


@dataclass
class CudaLayout:
    key: tuple
    groups: list[CudaGroup]
    outlier_channels: torch.Tensor
    outlier_weight_t: torch.Tensor
    sparse_crow: torch.Tensor
    sparse_col: torch.Tensor
    sparse_corr: torch.Tensor
    bias: torch.Tensor | None
    plans: dict = field(default_factory=dict)  # NT -> (Params, grid, smem)


def supported(layer) -> bool:
    bits = [b for b in layer.bit_widths if layer.group(b)[0].numel()]
    return len(bits) <= 3 and all(b in KPAD for b in bits)


@torch.no_grad()
def repack(layer) -> CudaLayout:
    key = _key(layer)
    cached = getattr(layer, "_cuda_layout", None)
    if cached is not None and cached.key == key:
        return cached
    groups = []
    for b in layer.bit_widths:
        ch, pk, cb = layer.group(b)
        n = ch.numel()
        if n:
            q = repack_group(layer, b)
            npad = q.shape[0] * 4 * (32 // b)  # whole quads: the kernel reads ch/cb without bounds checks
            chp = torch.zeros(npad, dtype=torch.int32, device=ch.device)
            chp[:n] = ch
            cbp = torch.zeros(npad, 2**b, dtype=torch.float16, device=ch.device)
            cbp[:n] = cb
            groups.append(CudaGroup(b, n, q.shape[0], q, cbp, chp))
    crow, col = layer.sparse_crow, layer.sparse_col
    rows = torch.repeat_interleave(torch.arange(layer.out_features, device=col.device), (crow[1:] - crow[:-1]).long())
    corr = layer.sparse_val.float() - _quantized_values(layer, rows, col.long())
    lay = CudaLayout(
        key=key, groups=groups,
        outlier_channels=layer.outlier_channels.to(torch.int32).contiguous(),  # format v3 stores int16 where it fits
        outlier_weight_t=layer.outlier_weight.t().contiguous(),
        sparse_crow=crow.to(torch.int32).contiguous(), sparse_col=col.to(torch.int32).contiguous(),
        sparse_corr=corr.contiguous(),
        bias=None if layer.bias is None else layer.bias.float().contiguous(),
    )
    layer._cuda_layout = lay
    return lay


def _smem(groups: list[CudaGroup], S: int, NT: int) -> tuple[int, list[tuple[int, int]]]:
    off, offs = 0, []
    for g in groups:
        qm = -(-g.nq // S)
        kp, v = KPAD[g.bits], 1 << g.bits
        lut = off
        off += qm * 4 * kp * v * 4
        xs = off
        if NT > 1:
            off += qm * 4 * kp * NT * 4
        off = -(-off // 512) * 512
        offs.append((lut, xs))
    return off + 128, offs  # + 128: the kernel aligns its base to 128 bytes


def plan(groups: list[CudaGroup], out: int, NT: int, sms: int, splits: int | None = None):
    rb = -(-out // NTHREADS)
    nq = max((g.nq for g in groups), default=1)
    if splits is None:
        S = max(1, -(-BLOCKS_PER_SM * sms // rb))
        while _smem(groups, S, NT)[0] > SMEM_TARGET and S < nq:
            S += 1
        S = max(1, min(S, nq))
    else:
        S = max(1, splits)
    smem, offs = _smem(groups, S, NT)
    return rb, S, smem, offs


# -- launch ----------------------------------------------------------------------------------------
_POOL: dict = {}  # device index -> (fp32 accumulator, counters), both kept zeroed by the kernel;
# old ones are kept alive because captured CUDA graphs may still point at them
_KEEP: list = []


def _workspace(dev: torch.device, n_part: int, n_cnt: int):
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    part, cnt = _POOL.get(i, (None, None))
    if part is None or part.numel() < n_part or cnt.numel() < n_cnt:
        if part is not None:
            _KEEP.append((part, cnt))
        np_ = max(n_part, 0 if part is None else part.numel(), 1 << 20)
        nc = max(n_cnt, 0 if cnt is None else cnt.numel(), 4096)
        part = torch.zeros(np_, dtype=torch.float32, device=dev)  # kept zeroed by the kernel
        cnt = torch.zeros(nc, dtype=torch.int32, device=dev)
        _POOL[i] = (part, cnt)
    return part, cnt


_SMS: dict[int, int] = {}


def _num_sms(dev: torch.device) -> int:
    i = dev.index if dev.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def _params(layer, lay: CudaLayout, NT: int, splits: int | None):
    k = (NT, splits)
    if k in lay.plans:
        return lay.plans[k]
    dev = layer.outlier_weight.device
    rb, S, smem, offs = plan(lay.groups, layer.out_features, NT, _num_sms(dev), splits)
    p = _Params()
    p.och, p.owt = lay.outlier_channels.data_ptr(), lay.outlier_weight_t.data_ptr()
    p.crow, p.scol, p.corr = lay.sparse_crow.data_ptr(), lay.sparse_col.data_ptr(), lay.sparse_corr.data_ptr()
    p.bias = lay.bias.data_ptr() if lay.bias is not None else None
    for i, g in enumerate(lay.groups):
        p.g[i].q, p.g[i].cb, p.g[i].ch = g.q.data_ptr(), g.codebook.data_ptr(), g.channels.data_ptr()
        p.g[i].n, p.g[i].nq, p.g[i].bits = g.n, g.nq, g.bits
        p.g[i].smem_off, p.g[i].xs_off = offs[i]
    p.ngroups = len(lay.groups)
    p.out, p.n_act, p.S = layer.out_features, lay.outlier_channels.numel(), S
    lay.plans[k] = (p, rb, S, smem)
    return lay.plans[k]


def pick_variant(layer, variant: str | None = None) -> str:
    """The one-token kernel for ``layer``: ``variant``, else ``$CMPQ_DECODE_VARIANT``, else the
    default; "auto" resolves by layer size (see ``DEFAULT_VARIANT``)."""
    variant = variant or os.environ.get("CMPQ_DECODE_VARIANT", DEFAULT_VARIANT)
    if variant not in VARIANTS:
        raise ValueError(f"unknown CMPQ decode variant {variant!r}; one of {VARIANTS}")
    if variant == "auto":
        return "v4s" if layer.out_features * layer.in_features <= AUTO_V4S_MAX_WEIGHTS else "v3b"
    return variant


# Which kernel serves 2..16 tokens: "v3b" (CUDA cores, T FFMAs per weight) or "mma" (kernel_mma.cu:
# tensor cores, mma.sync m16n8k16). Env CMPQ_DECODE_MULTI overrides.
DEFAULT_MULTI = "mma"  # faster than v3b at every shape/T measured (benchmarks/results/kernel-mma-h200.md)
MULTI_VARIANTS = ("v3b", "mma")


def pick_multi(multi: str | None = None) -> str:
    """The 2..16-token kernel: ``multi``, else ``$CMPQ_DECODE_MULTI``, else ``DEFAULT_MULTI``."""
    multi = multi or os.environ.get("CMPQ_DECODE_MULTI", DEFAULT_MULTI)
    if multi not in MULTI_VARIANTS:
        raise ValueError(f"unknown CMPQ multi-token decode kernel {multi!r}; one of {MULTI_VARIANTS}")
    return multi


def decode(layer, x: torch.Tensor, splits: int | None = None, variant: str | None = None,
           multi: str | None = None) -> torch.Tensor | None:
    """``layer(x)`` for 1..16 tokens on CUDA; None if the layer or input is unsupported.
    ``variant`` (default ``$CMPQ_DECODE_VARIANT`` or ``DEFAULT_VARIANT``) picks the one-token kernel;
    ``multi`` (default ``$CMPQ_DECODE_MULTI`` or ``DEFAULT_MULTI``) the 2..16-token one ("v3b" or
    "mma"); a kernel that does not apply falls back to v3b."""
    if x.numel() > x.shape[-1] and pick_multi(multi) == "mma" and torch.cuda.is_available():
        from cmpq.kernels import kernel_mma

        y = kernel_mma.decode(layer, x, splits)
        if y is not None:
            return y
    variant = pick_variant(layer, variant)
    if variant != "v3b" and x.numel() == x.shape[-1] and torch.cuda.is_available():
        from cmpq.kernels import kernel_v4

        y = kernel_v4.decode(layer, x, splits)
        if y is not None:
            return y
    lib = library()
    if lib is None or not supported(layer):
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], layer.out_features
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T == 0 or T > NT_CHOICES[-1]:
        return None
    NT = next(c for c in NT_CHOICES if c >= T)
    lay = repack(layer)
    p, rb, S, smem = _params(layer, lay, NT, splits)
    if smem > MAX_SMEM:
        return None
    part, cnt = _workspace(x.device, T * out, rb)
    y = torch.empty(T, out, dtype=x.dtype, device=x.device)
    p.x, p.y, p.part, p.cnt = x2.data_ptr(), y.data_ptr(), part.data_ptr(), cnt.data_ptr()
    p.ldx, p.T, p.is_bf16 = x2.stride(0), T, int(x.dtype == torch.bfloat16)
    err = lib.cmpq_lut_launch(ctypes.byref(p), NT, rb, S, smem, torch.cuda.current_stream(x.device).cuda_stream)
    if err:
        raise RuntimeError(f"cmpq CUDA decode kernel failed: {lib.cmpq_error_string(err).decode()}")
    return y.reshape(*lead, out)
