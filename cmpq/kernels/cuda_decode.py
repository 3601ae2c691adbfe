"""Decode kernel v3b (1..16 tokens): CUDA C++ (``lut_cuda.cu``) behind a ctypes call, and the build,
workspace and plan machinery the other CUDA kernels share.

Why CUDA and not Triton: see benchmarks/notes-kernels.md. In short, a per-channel codebook lookup
in Triton costs a 64-bit pointer per weight plus bit-plane unpacking (~15 instructions/weight);
here a weight costs 4 (SHF, LOP3, LDS with a 32-bit address, FADD), which fits the H200's budget
at the byte floor.

- The kernel reads the layer's runtime layout (``cmpq/kernels/layout.py``: quads, outlier columns
  transposed, sparse corrections), built once at load time, not here.
- ``library()``: compiles ``lut_cuda.cu`` with ``nvcc`` once per machine (about 10 s; cached in
  ``$CMPQ_CACHE`` or ``~/.cache/cmpq``), loads it with ctypes. Unavailable (no nvcc, build error)
  -> ``available()`` is False and dispatch falls back to the Triton kernel.
- ``decode(rt, x)``: one launch; works inside CUDA graphs (the launch goes to the current stream;
  the workspace is a per-device pool that is never freed). Launch parameters are memoised in
  ``PLANS`` under the layout's tensor addresses and shapes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections import OrderedDict
from typing import Any, Callable

import torch

from cmpq.kernels.layout import Group, Runtime

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lut_cuda.cu")
NTHREADS = 256
KPAD = {2: 16, 3: 16, 4: 8}
NT_CHOICES = (1, 4, 8, 16)
SMEM_TARGET = 48 << 10
MAX_SMEM = 200 << 10  # the kernel's dynamic shared-memory limit (cudaFuncSetAttribute)
BLOCKS_PER_SM = 6
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


# -- plans -----------------------------------------------------------------------------------------
class PlanCache:
    """Launch parameters (ctypes structs holding tensor addresses, grid, shared memory) by key.

    A key holds the runtime layout's tensor addresses and shapes (``Runtime.key``) and the launch
    options, and the parameters are a pure function of those: an entry can never go stale, even
    if the tensors are freed and their memory reused (same addresses and shapes, same
    parameters). Bounded, least recently used first out, so a process that loads many models does
    not grow without limit.
    """

    def __init__(self, size: int = 8192) -> None:
        self.size = size
        self.entries: OrderedDict[tuple, Any] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = self.entries[key] = make()
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


PLANS = PlanCache()


def _smem(groups: tuple[Group, ...], S: int, NT: int) -> tuple[int, list[tuple[int, int]]]:
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


def plan(groups: tuple[Group, ...], out: int, NT: int, sms: int, splits: int | None = None):
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


def _params(rt: Runtime, NT: int, splits: int | None):
    return PLANS.get(("v3b", rt.key, NT, splits), lambda: _make_params(rt, NT, splits))


def _make_params(rt: Runtime, NT: int, splits: int | None):
    rb, S, smem, offs = plan(rt.groups, rt.out, NT, _num_sms(rt.device), splits)
    p = _Params()
    p.och, p.owt = rt.outlier_channels.data_ptr(), rt.outlier_weight_t.data_ptr()
    p.crow, p.scol, p.corr = rt.sparse_crow.data_ptr(), rt.sparse_col.data_ptr(), rt.sparse_corr.data_ptr()
    p.bias = rt.bias.data_ptr() if rt.bias is not None else None
    for i, g in enumerate(rt.groups):
        p.g[i].q, p.g[i].cb, p.g[i].ch = g.q.data_ptr(), g.codebook.data_ptr(), g.channels.data_ptr()
        p.g[i].n, p.g[i].nq, p.g[i].bits = g.n, g.nq, g.bits
        p.g[i].smem_off, p.g[i].xs_off = offs[i]
    p.ngroups = len(rt.groups)
    p.out, p.n_act, p.S = rt.out, rt.outlier_channels.numel(), S
    return p, rb, S, smem


def decode(rt: Runtime, x: torch.Tensor, splits: int | None = None) -> torch.Tensor | None:
    """``x @ W^T + bias`` for 1..16 tokens on CUDA from runtime layout ``rt`` (v3b); None if it does
    not apply. Which kernel serves a call is ``cmpq.kernels.dispatch``'s choice, not this one's."""
    if not x.is_cuda:
        return None
    lib = library()
    if lib is None or not rt.groups:
        return None
    lead, n_in, out = x.shape[:-1], x.shape[-1], rt.out
    x2 = x.reshape(-1, n_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    T = x2.shape[0]
    if T == 0 or T > NT_CHOICES[-1]:
        return None
    NT = next(c for c in NT_CHOICES if c >= T)
    p, rb, S, smem = _params(rt, NT, splits)
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
