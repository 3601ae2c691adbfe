"""Model-level runners for the baselines: RTN, GPTQ, AWQ, LLM-MQ and HQQ on a whole causal LM.

Every runner leaves *fake-quantized* weights in the model: each block linear's ``weight`` is replaced
by its dequantized value (same dtype, same ``nn.Linear``), so the model runs and saves as a plain
Hugging Face model. What a packed deployment would store is counted instead in the report's
``effective_bits`` (every byte of the quantized linears: codes, scales, zeros, group indices,
codebooks), so the figures compare with CMPQ's packed ``effective_bits``.

Calibrated methods (GPTQ, AWQ, LLM-MQ) use the same block walk as CMPQ
(:func:`cmpq.model.calibration.walk_blocks`); calibration-free ones (RTN, HQQ) visit the blocks
directly, since running data through the model would change nothing.
"""

from __future__ import annotations

import copy
import hashlib
import time
import weakref
from typing import Callable

import torch
from torch import nn

from cmpq.algorithm.layer import quantize_weight
from cmpq.config import CMPQConfig
from cmpq.data.tokens import Windows
from cmpq.model.blocks import find_blocks, find_linears
from cmpq.model.calibration import SquaredNorm, walk_blocks
from cmpq.options import RunOptions

from .awq import awq_quantize, awq_search_clip, awq_search_scale
from .gptq import HessianAccumulator, gptq_quantize
from .llmmq import allocate_layer_bits, first_order_sensitivity, proxy_sensitivity
from .rtn import rtn_bits_per_weight, rtn_quantize

METHODS = ("rtn", "gptq", "awq", "llmmq", "hqq")
CALIBRATED = ("gptq", "awq", "llmmq")
QK_NAMES = ("q_proj", "k_proj", "query", "key", "Wqkv")  # AWQ does not clip these (softmax follows)


class _Tally:
    """Storage bits of the quantized linears, summed over layers, weighted by their size."""

    def __init__(self) -> None:
        self.bits, self.weights = 0.0, 0

    def add(self, lin: nn.Linear, bits_per_weight: float) -> None:
        n = lin.weight.numel()
        self.bits += bits_per_weight * n
        self.weights += n

    @property
    def mean(self) -> float:
        return self.bits / max(self.weights, 1)


def _each_block(model: nn.Module, fn: Callable[[int, nn.Module, dict], None], device: torch.device) -> None:
    """Calibration-free walk: each block moves to ``device`` for its turn, then back."""
    _, blocks = find_blocks(model)
    home = next(model.parameters()).device
    for i, block in enumerate(blocks):
        block.to(device)
        fn(i, block, find_linears(block))
        block.to(home)


def _set(lin: nn.Linear, w_hat: torch.Tensor) -> None:
    lin.weight.data.copy_(w_hat.to(lin.weight.dtype))


# ------------------------------------------------------------------ RTN, HQQ (calibration-free)


def _run_rtn(model, windows, bits, group_size, device, tally, extras, log, **_) -> None:
    def qb(i, block, linears):
        for lin in linears.values():
            _set(lin, rtn_quantize(lin.weight.data, int(bits), group_size))
            tally.add(lin, rtn_bits_per_weight(lin.in_features, int(bits), group_size))

    _each_block(model, qb, device)


def hqq_available() -> str | None:
    """None when ``hqq`` imports, else why not (recorded in reports instead of failing silently)."""
    try:
        import hqq.core.quantize  # noqa: F401
    except Exception as e:  # an ImportError, or a broken dependency inside hqq
        return f"{type(e).__name__}: {e}"
    return None


def _run_hqq(model, windows, bits, group_size, device, tally, extras, log, **_) -> None:
    """HQQ (Badri & Shaji, 2023) from the ``hqq`` package, its defaults (axis 1, 20 proximal steps).

    HQQ groups ``group_size`` consecutive weights of the *flattened* matrix; with ``in_features``
    not a multiple of the group (576 = 4.5 x 128) some groups span two output rows. That is the
    package's own behaviour and is kept as is. Bytes counted: the packed codes ``W_q`` and the
    ``scale``/``zero`` tensors exactly as HQQ holds them.
    """
    why = hqq_available()
    if why:
        raise RuntimeError(f"hqq cannot run here: {why}")
    import hqq
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    extras["hqq_version"] = hqq.__version__
    cfg = BaseQuantizeConfig(nbits=int(bits), group_size=group_size, axis=1)

    def qb(i, block, linears):
        for lin in linears.values():
            hq = HQQLinear(lin, cfg, compute_dtype=lin.weight.dtype, device=str(device), del_orig=False)
            _set(lin, hq.dequantize().reshape(lin.weight.shape))
            stored = [hq.W_q] + [hq.meta[k] for k in ("scale", "zero") if torch.is_tensor(hq.meta.get(k))]
            nbytes = sum(t.numel() * t.element_size() for t in stored)
            tally.add(lin, 8 * nbytes / lin.weight.numel())

    _each_block(model, qb, device)


# ------------------------------------------------------------------ GPTQ, AWQ (calibrated)


class _InputPool:
    """The linears of one block, and the tensor the last of them was fed (a weak reference and its
    version counter, so a tensor freed or changed in place never counts as "the same")."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.last: tuple | None = None  # (weakref to the input, its _version, its accumulator)


class _PooledHessian:
    """One linear's ``X^T X``, shared with the linear hooked just before it when that one was fed the
    very same tensor (q/k/v read one normed hidden state, gate/up another): one accumulation, and one
    GPTQ solve, serve them all. Which linears share is decided on the first batch; a later batch that
    disagrees raises (it would mean the block routes its inputs differently from batch to batch)."""

    def __init__(self, pool: _InputPool, in_features: int, device, share: bool = True,
                 first_token_weight: float = 1.0) -> None:
        self.pool, self.in_features, self.device, self.share = pool, in_features, device, share
        self.first_token_weight = first_token_weight
        self.acc: HessianAccumulator | None = None
        self.shared: bool | None = None

    def add(self, x: torch.Tensor) -> None:
        last = self.pool.last
        same = (self.share and last is not None and last[0]() is x and last[1] == x._version
                and last[2].sum.shape[0] == self.in_features)
        if self.shared is None:
            self.shared = same
            self.acc = last[2] if same else HessianAccumulator(self.in_features, self.device,
                                                               first_token_weight=self.first_token_weight)
        elif same != self.shared or (same and last[2] is not self.acc):
            raise RuntimeError("GPTQ: linears shared their input in one calibration batch but not in another; "
                               "run with share_hessians=False")
        if not same:
            self.acc.add(x)
        self.pool.last = (weakref.ref(x), x._version, self.acc)

    @property
    def H(self) -> torch.Tensor:
        if self.acc is None:
            raise RuntimeError("no calibration inputs were added")
        return self.acc.H


def _run_gptq(model, windows, bits, group_size, device, tally, extras, log, *, damp: float = 0.01,
              block_size: int = 128, act_order: bool = False, static_groups: bool = False,
              share_hessians: bool = True, first_token_weight: float = 1.0, batch_size: int = 8,
              token_weighting: str = "none", **_) -> None:
    """GPTQ with all linears of a block hooked in one pass (the paper's default, not true-sequential).

    Linears fed the same tensor (q/k/v, gate/up) share one Hessian and are solved as one matrix (their
    rows stacked): GPTQ treats rows independently, so this is the same result with fewer accumulations,
    Cholesky factorizations and column loops (``share_hessians=False``: one per linear, as the reference).
    ``first_token_weight`` (not the reference's; default 1 = off): see :class:`HessianAccumulator`.
    ``token_weighting="gradient"``: the Hessian that CMPQ's default uses, each token weighted by
    ``||dL/dy_t||^2`` from one backward pass of the full-precision model (cmpq.model.sensitivity),
    so GPTQ gets the same help (one Hessian per linear then).
    """
    if token_weighting not in ("none", "gradient"):
        raise ValueError(f"token_weighting must be 'none' or 'gradient', got {token_weighting!r}")
    solves = [0]
    weights = None
    if token_weighting == "gradient":
        from cmpq.model import sensitivity
        from cmpq.model.blocks import find_blocks, find_linears

        sens = sensitivity.measure(model, windows.ids, device, log)
        _, blocks = find_blocks(model)
        weights = {id(lin): sens[(i, n)].token_weight for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}

    def qb(i, block, linears, stats):
        groups: dict[int, list[str]] = {}
        for lin_name in linears:
            groups.setdefault(id(getattr(stats[lin_name], "acc", stats[lin_name])), []).append(lin_name)
        for names in groups.values():
            lins = [linears[n] for n in names]
            W = torch.cat([lin.weight.data for lin in lins]) if len(lins) > 1 else lins[0].weight.data
            W_hat = gptq_quantize(W, stats[names[0]].H, int(bits), group_size, damp, block_size, act_order,
                                  static_groups)
            solves[0] += 1
            for lin, w_hat in zip(lins, W_hat.split([lin.out_features for lin in lins])):
                _set(lin, w_hat)
                bpw = rtn_bits_per_weight(lin.in_features, int(bits), group_size)
                if act_order and not static_groups and group_size is not None and group_size < lin.in_features:
                    bpw += 32 / lin.out_features  # int32 group index per input column (g_idx)
                tally.add(lin, bpw)

    pool = [_InputPool()]

    def make_stats(name, lin):
        if weights is not None:
            from cmpq.model.calibration import WeightedHessian

            return WeightedHessian(lin.in_features, lin.weight.device, weights[id(lin)])
        if name in pool[0].names:  # a new block
            pool[0] = _InputPool()
        pool[0].names.add(name)
        return _PooledHessian(pool[0], lin.in_features, lin.weight.device, share_hessians, first_token_weight)

    extras.update(damp=damp, block_size=block_size, act_order=act_order, static_groups=static_groups,
                  share_hessians=share_hessians, first_token_weight=first_token_weight,
                  token_weighting=token_weighting)
    walk_blocks(model, windows.ids, make_stats, qb, device=device, batch_size=batch_size, log=log)
    extras["gptq_solves"] = solves[0]


class TokenSample:
    """A uniform random sample of at most ``max_tokens`` input rows of one linear (bottom-k keys).

    Every token gets a random key from a generator seeded identically for every linear, so linears
    that read the same tensor (q/k/v, gate/up) keep the very same sample. ``fingerprint`` (shape
    and sum of the first batch) tells which linears share their input.
    """

    def __init__(self, max_tokens: int = 4096, seed: int = 0) -> None:
        self.max_tokens = max_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.x: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.fingerprint: tuple | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.fingerprint is None:
            self.fingerprint = (tuple(x.shape), float(x.float().sum()))
        keys = torch.rand(x.shape[0], generator=self.gen).to(x.device)
        if self.x is not None:
            x, keys = torch.cat([self.x, x]), torch.cat([self.keys, keys])
        if x.shape[0] > self.max_tokens:
            keep = torch.topk(keys, self.max_tokens, largest=False).indices
            x, keys = x[keep], keys[keep]
        self.x, self.keys = x, keys


def _run_awq(model, windows, bits, group_size, device, tally, extras, log, *, max_tokens: int = 4096,
             grid: int = 20, clip: bool = True, seed: int = 0, batch_size: int = 8, **_) -> None:
    """AWQ: linears sharing an input get one scale search; clip search per linear but q/k."""
    ratios: list[float] = []
    unscaled: list[str] = []

    def qb(i, block, linears, stats):
        groups: dict[tuple, list[str]] = {}
        for name in linears:
            groups.setdefault(stats[name].fingerprint, []).append(name)
        v_out = next((lin.out_features for n, lin in linears.items() if n.endswith("v_proj")), None)
        for names in groups.values():
            x = stats[names[0]].x
            if len(names) == 1 and names[0].endswith(("o_proj", "out_proj")) and v_out is not None \
                    and v_out != linears[names[0]].in_features:
                # Grouped-query attention: o_proj's input scales could only be folded into v_proj if
                # they were equal across the heads sharing a KV head, so a deployable AWQ model
                # (AutoAWQ, llm-awq) leaves o_proj unscaled; so do we (clip search only).
                scales = torch.ones(linears[names[0]].in_features, device=x.device)
                unscaled.append(f"{i}.{names[0]}")
            else:
                scales, losses = awq_search_scale([linears[n].weight.data for n in names], x, int(bits), group_size, grid)
                ratios.append(float(losses.min() / losses[0]) if losses[0] > 0 else 1.0)
            for n in names:
                W = linears[n].weight.data
                qk = any(k in n for k in QK_NAMES)
                cm = awq_search_clip(W, x, scales, int(bits), group_size, grid) if clip and not qk else None
                _set(linears[n], awq_quantize(W, scales, int(bits), group_size, cm))
                tally.add(linears[n], rtn_bits_per_weight(linears[n].in_features, int(bits), group_size))

    walk_blocks(model, windows.ids, lambda n, lin: TokenSample(max_tokens, seed), qb,
                device=device, batch_size=batch_size, log=log)
    extras.update(max_tokens=max_tokens, grid=grid, clip=clip,
                  scale_loss_ratio_mean=sum(ratios) / max(len(ratios), 1), input_groups=len(ratios),
                  unscaled_gqa_o_proj=len(unscaled))


# ------------------------------------------------------------------ LLM-MQ (layer-wise mixed precision)


def _layer_names(model: nn.Module) -> dict[str, nn.Linear]:
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": lin for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}


def lm_gradients(model: nn.Module, ids: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Gradient of the mean LM loss on ``ids`` w.r.t. every block linear's weight (CPU, float32).

    Runs on a float32 copy so small gradients of a converged model do not underflow in fp16.
    """
    m = copy.deepcopy(model)
    nn.Module.to(m, device=device, dtype=torch.float32)  # GGUF-loaded models refuse PreTrainedModel.float()
    for p in m.parameters():
        p.requires_grad_(False)
    lins = _layer_names(m)
    for lin in lins.values():
        lin.weight.requires_grad_(True)
    with torch.enable_grad():
        for row in ids:
            r = row[None].to(device)
            (m(input_ids=r, labels=r, use_cache=False).loss / ids.shape[0]).backward()
    grads = {n: lin.weight.grad.detach().cpu() for n, lin in lins.items()}
    del m
    return grads


def _llmmq_candidates(model, windows, device, log, sensitivity, grad_nsamples, act_frac, weight_frac, batch_size):
    """Each layer quantized at 2, 3 and 4 bits by CMPQ's non-uniform quantizer (one width per layer,
    ``edge_frac=0``), from the full-precision model: dequantized weights (CPU), CMPQ storage bits per
    weight, and the sensitivity score of each width."""
    from cmpq.nn.linear import pack_linear

    grads = lm_gradients(model, windows.ids[:grad_nsamples], device) if sensitivity == "first_order" else None
    prefix, _ = find_blocks(model)
    cands: dict[str, dict[int, tuple[torch.Tensor, float, float]]] = {}
    cfgs = {b: CMPQConfig(bits=b, algorithm="paper", edge_frac=0.0, act_outlier_frac=act_frac, weight_outlier_frac=weight_frac)
            for b in (2, 3, 4)}

    def qb(i, block, linears, stats):
        for name, lin in linears.items():
            full = f"{prefix}.{i}.{name}"
            W = lin.weight.data
            cands[full] = {}
            for b, cfg in cfgs.items():
                parts = quantize_weight(W, stats[name].sqsum, cfg, name=full)
                W_hat = parts.dequantize()
                nbytes = sum(pack_linear(parts, None).storage_bytes().values())
                if grads is not None:
                    s = first_order_sensitivity(W, grads[full].to(W.device), W_hat)
                else:
                    s = proxy_sensitivity(W, stats[name].sqsum, W_hat)
                cands[full][b] = (W_hat.to("cpu", W.dtype), 8 * nbytes / W.numel(), s)

    # the walk leaves the weights untouched: all scores come from the full-precision model
    walk_blocks(model, windows.ids, lambda n, lin: SquaredNorm(lin.in_features, lin.weight.device), qb,
                device=device, batch_size=batch_size, log=log)
    return cands


def llmmq_identity(model: nn.Module, windows: Windows) -> tuple[str, str]:
    """What LLM-MQ's candidates depend on besides its options: digests of every block linear's weight
    (name, shape, dtype, bytes) and of the calibration tokens. A cache keyed by it is never reused for
    another model, a model already quantized, or other calibration windows (about 0.3 s per 100M weights)."""
    h = hashlib.blake2b(digest_size=16)
    for name, lin in _layer_names(model).items():
        w = lin.weight.detach()
        h.update(f"{name}:{tuple(w.shape)}:{w.dtype};".encode())
        h.update(w.contiguous().view(-1).view(torch.uint8).cpu().numpy())
    ids = windows.ids.detach().to("cpu", torch.int64).contiguous()
    c = hashlib.blake2b(f"{tuple(ids.shape)};".encode() + ids.numpy().tobytes(), digest_size=16)
    return h.hexdigest(), c.hexdigest()


def _run_llmmq(model, windows, bits, group_size, device, tally, extras, log, *, sensitivity: str = "first_order",
               grad_nsamples: int = 8, act_outlier_frac: float = 0.0, weight_outlier_frac: float = 0.0,
               cache: dict | None = None, exact: bool = True, batch_size: int = 8, **_) -> None:
    """LLM-MQ's integer program over layers, solved exactly (``allocate_layer_bits``), any budget in
    [2, 4]; ``exact``: spend the budget exactly when reachable (equal-bits comparison). ``cache`` (a
    dict the caller keeps) reuses the candidates across budgets of one model: keyed by
    :func:`llmmq_identity` and the options, so a hit gives the very result a fresh computation would."""
    if sensitivity not in ("first_order", "proxy"):
        raise ValueError(f"llmmq sensitivity must be 'first_order' or 'proxy', got {sensitivity!r}")
    t0 = time.perf_counter()
    key = (llmmq_identity(model, windows), sensitivity, grad_nsamples, act_outlier_frac, weight_outlier_frac,
           batch_size, str(device)) if cache is not None else None
    if cache is not None and key in cache:
        cands, cand_s = cache[key]
        extras["reused_candidates"] = True
    else:
        cands = _llmmq_candidates(model, windows, device, log, sensitivity, grad_nsamples,
                                  act_outlier_frac, weight_outlier_frac, batch_size)
        cand_s = time.perf_counter() - t0
        if cache is not None:
            cache[key] = (cands, cand_s)
    lins = _layer_names(model)
    sizes = {n: lins[n].weight.numel() for n in cands}
    alloc = allocate_layer_bits({n: {b: c[2] for b, c in cb.items()} for n, cb in cands.items()}, sizes, float(bits),
                                fill_budget=exact)
    for n, b in alloc.items():
        W_hat, bpw, _ = cands[n][b]
        _set(lins[n], W_hat)
        tally.add(lins[n], bpw)
    nominal = sum(b * sizes[n] for n, b in alloc.items()) / sum(sizes.values())
    extras.update(sensitivity=sensitivity, grad_nsamples=grad_nsamples if sensitivity == "first_order" else None,
                  act_outlier_frac=act_outlier_frac, weight_outlier_frac=weight_outlier_frac,
                  nominal_bits=nominal, exact_budget=exact, layers_by_bits={b: sum(v == b for v in alloc.values()) for b in (2, 3, 4)},
                  allocation=alloc, candidates_seconds=round(cand_s, 2))


RUNNERS = {"rtn": _run_rtn, "gptq": _run_gptq, "awq": _run_awq, "llmmq": _run_llmmq, "hqq": _run_hqq}


# ------------------------------------------------------------------ entry point


@torch.no_grad()
def quantize_baseline(
    model: nn.Module,
    tokenizer=None,
    method: str = "rtn",
    bits: float = 4,
    group_size: int | None = 128,
    calib="c4",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = print,
    **opts,
) -> dict:
    """Quantize ``model`` in place with a baseline; returns the report (also in ``model.config.cmpq_baseline``).

    ``bits``: an integer 2..4 for rtn/gptq/awq/hqq; any budget in [2, 4] for llmmq. ``group_size``:
    128 (ragged last group kept), or None for one grid per output row (llmmq ignores it). ``calib``:
    as :func:`cmpq.quantize.resolve_calibration` (unused by rtn/hqq). ``opts`` go to the method
    (gptq: damp, block_size, act_order, static_groups, share_hessians, first_token_weight, token_weighting; awq: max_tokens, grid, clip; llmmq: sensitivity,
    grad_nsamples, act_outlier_frac, weight_outlier_frac, cache).
    """
    from cmpq.quantize import default_device, resolve_calibration

    if method not in RUNNERS:
        raise ValueError(f"unknown baseline {method!r}; choose from {METHODS}")
    if method != "llmmq" and (float(bits) != int(bits) or int(bits) not in (2, 3, 4)):
        raise ValueError(f"{method} takes an integer bit width 2, 3 or 4, got {bits!r}")
    device = torch.device(device) if device is not None else default_device()
    windows: Windows | None = None
    if method in CALIBRATED:
        if tokenizer is None and not isinstance(calib, (Windows, torch.Tensor)):
            raise ValueError("pass a tokenizer, or calibration tokens as a tensor [nsamples, seqlen]")
        windows = resolve_calibration(tokenizer, RunOptions(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed))
        if log:
            log(f"calibration: {windows.description}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    tally, extras = _Tally(), {}
    t0 = time.perf_counter()
    RUNNERS[method](model, windows, bits, None if method == "llmmq" else group_size, device, tally, extras, log,
                    seed=seed, **opts)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    report = {
        "quant_method": method,
        "fake_quantized": True,
        "bits": float(bits),
        "group_size": None if method == "llmmq" else group_size,
        "effective_bits": tally.mean,
        "quantized_weights": tally.weights,
        "quantize_seconds": round(time.perf_counter() - t0, 2),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "calibration": windows.description if windows else "none (calibration-free)",
        **{k: v for k, v in extras.items()},
    }
    if "reused_candidates" in report:  # the per-budget cost plus the shared candidate pass
        report["quantize_seconds"] = round(report["quantize_seconds"] + report["candidates_seconds"], 2)
    model.config.cmpq_baseline = {k: v for k, v in report.items() if k != "allocation"}
    if log:
        log(f"{method} {bits}-bit: {tally.mean:.3f} effective bits per weight, {report['quantize_seconds']}s")
    return report
