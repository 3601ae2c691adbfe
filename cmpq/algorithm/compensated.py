"""CMPQ with error compensation: per-channel codebooks quantized in GPTQ order.

GPTQ (Frantar et al., 2022) quantizes the input channels (columns) of ``W`` one at a time and
pushes each column's error onto the columns not yet quantized through the inverse Hessian of
``||X dW^T||^2``. In CMPQ one column is one channel is one codebook, so the per-column step of
GPTQ, "round this column to its grid", becomes "map this column to its nearest centroids", and
everything else carries over unchanged (the Cholesky form, lazy blocks, dead inputs, dampening).

Choices, and why:

* **Codebooks are fitted per lazy block on the updated weights.** When a block of columns is
  reached, the errors of every earlier block have been applied, so k-means sees (nearly) the values
  it will quantize. Each width is first clustered once over the whole layer (one vectorized call);
  a block's refit warm-starts from that and runs ``REFIT_ITERS`` Lloyd steps, because k-means is
  launch-bound and a cold start per block cost 5x the time (H200: 13 s per SmolLM2 block, measured
  2026-12-02). Updates from columns inside the same block arrive after the fit; they are small
  next to the columns' spread.
* **Order:** quantized columns by decreasing ``H_jj`` (GPTQ's act-order), FP16 columns last. FP16
  columns have no error of their own, so placed last they absorb compensation for free: they are
  stored at their updated values.
* **Sparse outliers** (O_q) are chosen before the pass, as the weights whose first-guess error
  (k-means on the original column) weighs most, ``H_jj * err^2``; they are left out of their
  column's k-means and stored at their updated value when the column is reached (error 0).
* ``H`` should be the token-weighted Hessian (``cmpq.model.sensitivity``): plain ``X^T X`` lets
  GPTQ move error onto the attention-sink token (see ``studies/gptq_quality.py``).

* **Row scales** (``row_scale=True``): a codebook is shared by every output row of its channel, so
  rows of very different magnitude (attention heads, gate rows) compete for its few entries. Each
  row is divided by its RMS (relative to the layer's mean, stored in FP16) and the codebooks are
  fitted to the scaled rows with row weights ``s_r^2``, so the objective stays the true squared
  error. GPTQ's error feedback works row by row with one inverse Hessian, so it commutes with the
  scaling exactly. Cost: 16 bits per output row, charged to the budget. CPU studies on SmolLM2-135M:
  weight error of per-channel codebooks -11% at 3 bits and -12% at 4 bits over 28 linears
  (``studies/row_scale_weights.py``); WikiText-2 without fine-tuning 27.79 -> 27.35 at 4.3 effective
  bits and 34.91 -> 34.17 at 3.36 (``studies/row_scale.py``, scales charged).

* **Layers of one shape walk together** (``quantize_compensated_group``; a block's q/k/v/o, gate/up,
  a mixture's experts): the lazy blocks of all of them advance in lockstep and every k-means run
  (initial fit and refits) is one call over all their columns. Each column's run is independent of
  the others in its call, so every layer gets exactly the parts it gets alone (tested), and the
  block costs fewer launches: 232k -> 144k ATen calls on a Llama-7B-shaped block, 80k -> 53k on a
  SmolLM2 block (GPU path, counted on CPU: ``studies/kmeans_launch_time.py --groups``). Their
  codebooks are also rounded to the stored grid in one call per lazy block (``_round_together``):
  a 7B-shaped q/k/v/o group's pass went 20,835 -> 12,835 ATen calls that launch a kernel, gate/up's
  11,667 -> 9,043 (views left out, Lloyd's and the column loop one launch each; CPU count with
  64-row stand-ins, 2026-12-07; not timed on a GPU).

Widths may be any of 1..8 bits per channel, or ``FP16`` for a whole FP16 column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cmpq.algorithm.budget import FP16
from cmpq.algorithm import kmeans
from cmpq.algorithm.kmeans import assign_nearest, kmeans_1d, mean_one_weights, share_runs, stacked_row_weights
from cmpq.algorithm.layer import QuantizedParts
from cmpq.baselines.gptq import _inverse_hessian_cholesky
from cmpq.kernels.dispatch import triton_available
from cmpq.kernels.feedback import MAX_KERNEL_BLOCK, MAX_KERNEL_ENTRIES, column_feedback, column_feedback_reference
from cmpq.storage.codebook import storable


@dataclass
class _Fit:
    """One k-means request of one layer: rows ``x`` ``[n, out]`` with ``k`` ``[n]`` entries each,
    padded to ``kr`` slots; ``keep``/``init`` as ``kmeans_1d`` takes them (``init`` None: a cold start)."""

    x: torch.Tensor
    k: torch.Tensor
    kr: int
    weight: torch.Tensor | None
    keep: torch.Tensor | None = None
    init: torch.Tensor | None = None


def _run_fits(fits: list[_Fit], iters: int, swaps: int, shared: bool) -> list[torch.Tensor]:
    """Codebooks ``[n, kr]`` for each request, several layers' requests in one ``kmeans_1d`` call.

    Each row's k-means run is independent of the others in its call, and a codebook padded with
    absent (+inf) entries runs exactly as it would alone (``kmeans_1d``'s ``ks`` and ``init``), so
    merging changes no result, only the number of launches: on a GPU (``shared``) every request is
    merged into one call; on a CPU, where padding costs work, only requests of the same size are."""
    out: list[torch.Tensor | None] = [None] * len(fits)
    keys = [0 if shared else f.kr for f in fits]
    for key in dict.fromkeys(keys):
        ids = [i for i, kk in enumerate(keys) if kk == key]
        K = max(fits[i].kr for i in ids)
        x = torch.cat([fits[i].x for i in ids])
        weight = stacked_row_weights([(fits[i].x.shape[0], fits[i].weight) for i in ids], x.shape[1], x.device)
        if fits[ids[0]].init is None:
            ks = torch.cat([fits[i].k for i in ids])
            cb = kmeans_1d(x.float().contiguous(), K, None, max_iter=iters, weight=weight, swaps=swaps,
                           ks=ks if shared else None)  # not shared: every row has K entries
        else:
            keep = torch.cat([fits[i].keep for i in ids])
            init = torch.cat([F.pad(fits[i].init, (0, K - fits[i].kr), value=torch.inf) for i in ids])
            cb = kmeans_1d(x, K, keep, max_iter=iters, init=init, weight=weight)
        for i, part in zip(ids, cb.split([fits[i].x.shape[0] for i in ids])):
            out[i] = part[:, : fits[i].kr]
    return out  # type: ignore[return-value]


def _initial_fits(W: torch.Tensor, widths: torch.Tensor, row_weight: torch.Tensor | None,
                  shared: bool) -> tuple[list[torch.Tensor], list[_Fit]]:
    """The initial fits' requests (``initial_codebooks``) and the columns of each: all quantized
    columns in one request when ``shared``, else one request per width."""
    bits = sorted(set(widths.tolist()) - {FP16})
    if not bits:
        return [], []
    if shared:
        cols = (widths != FP16).nonzero().squeeze(1)
        return [cols], [_Fit(W[:, cols].T, 2 ** widths[cols], 2 ** bits[-1], row_weight)]
    cols = [(widths == b).nonzero().squeeze(1) for b in bits]
    return cols, [_Fit(W[:, c].T, torch.full((c.numel(),), 2**b, device=W.device), 2**b, row_weight)
                  for b, c in zip(bits, cols)]


def _initial_books(widths: torch.Tensor, cols: list[torch.Tensor], fitted: list[torch.Tensor],
                   shared: bool) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``initial_codebooks``'s result from its requests' codebooks (``_initial_fits``)."""
    bits = sorted(set(widths.tolist()) - {FP16})
    if shared and bits:
        wc = widths[cols[0]]
        return {b: (cols[0][wc == b], storable(fitted[0][wc == b, : 2**b])) for b in bits}
    return {b: (c, storable(cb)) for b, c, cb in zip(bits, cols, fitted)}


def initial_codebooks(W: torch.Tensor, widths: torch.Tensor, iters: int,
                      row_weight: torch.Tensor | None = None, swaps: int = 0,
                      shared: bool | None = None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """width -> (columns, codebooks ``[n_b, 2**b]``) fitted on the original columns, every width in
    one vectorized k-means call (``kmeans_1d``'s ``ks``: each column gets its own codebook size; on a
    GPU, ``shared=None``, see ``kmeans.share_runs``; else one call per width, the same result): the
    sparse-outlier search uses them, and every lazy block warm-starts from them (k-means calls are
    launch-bound; a warm start needs few iterations). ``swaps``: merge-and-split rounds after Lloyd;
    the warm-started refits inherit the better start. The compensated pass builds the same requests
    for several layers at once (``quantize_compensated_group``)."""
    shared = share_runs(W.device) if shared is None else shared
    cols, fits = _initial_fits(W, widths, row_weight, shared)
    return _initial_books(widths, cols, _run_fits(fits, iters, swaps, shared), shared)


def select_sparse(W: torch.Tensor, hdiag: torch.Tensor, books: dict[int, tuple[torch.Tensor, torch.Tensor]],
                  n_sparse: int, row_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the ``n_sparse`` quantized-column weights with the largest ``H_jj * err^2``
    (times the row's weight, if given), ``err`` against the column's initial codebook."""
    dev = W.device
    e = torch.empty(0, dtype=torch.long, device=dev)
    if n_sparse <= 0 or not books:
        return e, e
    out_f = W.shape[0]
    scores, flat = [], []
    for cols, cb in books.values():
        x = W[:, cols].T.float().contiguous()
        err = (x - cb.gather(1, assign_nearest(x, cb))).pow(2) * hdiag[cols, None]
        if row_weight is not None:
            err = err * row_weight[None, :]
        v, j = torch.topk(err.reshape(-1), min(n_sparse, err.numel()))
        scores.append(v)
        flat.append(cols[j // out_f] * out_f + j % out_f)
    v, f = torch.cat(scores), torch.cat(flat)
    top = f[torch.topk(v, min(n_sparse, v.numel())).indices]
    return top % out_f, top // out_f


REFIT_ITERS = 10  # Lloyd iterations of each lazy block's warm-started refit


def _column_loop(choice: str, dev: torch.device, kmax: int, block_size: int):
    """The lazy block's column walk for ``choice`` (``quantize_compensated``'s ``column_loop``)."""
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"column_loop must be 'auto', 'torch' or 'triton', got {choice!r}")
    if choice == "auto":
        fits = kmax <= MAX_KERNEL_ENTRIES and block_size <= MAX_KERNEL_BLOCK
        choice = "triton" if dev.type == "cuda" and fits and triton_available() else "torch"
    if choice == "triton" and not triton_available():
        raise RuntimeError("column_loop='triton' needs Triton (pip install triton)")
    return column_feedback if choice == "triton" else column_feedback_reference


@torch.no_grad()
def row_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row scales ``s`` ``[out]`` (FP16 values, float32): each row's RMS over the layer's mean
    RMS, so ``weight / s`` keeps the layer's magnitude (the kernels accumulate ``x @ (W / s)^T`` in
    the activations' dtype before scaling back) while every row gets the same spread. All-zero rows
    get the mean."""
    rms = weight.detach().float().pow(2).mean(dim=1).sqrt()
    mean = rms[rms > 0].mean() if (rms > 0).any() else rms.new_tensor(1.0)
    s = torch.where(rms > 0, rms / mean, torch.ones_like(rms))
    return s.clamp(2**-14, 2**14).half().float()  # stored in FP16: divide by exactly what is stored


def scale_rows(weight: torch.Tensor, row_weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(``weight / s``, row weights ``s^2 * row_weight`` that keep a fit's objective the true squared
    error, ``s``) with ``s = row_scales(weight)``: the one place the allocation's distortion and the
    compensated pass scale rows, so the widths are planned for the fit that is made."""
    s = row_scales(weight)
    return weight.float() / s[:, None], s**2 * (1 if row_weight is None else row_weight), s


@dataclass
class LayerJob:
    """One layer's inputs to the compensated pass (``quantize_compensated``'s per-layer arguments)."""

    weight: torch.Tensor
    H: torch.Tensor
    widths: torch.Tensor
    n_sparse: int
    name: str = "weight"
    row_weight: torch.Tensor | None = None


class _LayerPass:
    """One layer through the compensated pass: ``quantize_compensated``'s state, cut at its k-means
    calls so that layers of one shape (q/k/v/o, gate/up) walk their lazy blocks in lockstep and
    share every k-means run (``quantize_compensated_group``). The walk of a 7B block was ~250k
    launches, most of them k-means steps (``studies/results/compensated-calls-7b-cpu.json``)."""

    def __init__(self, job: LayerJob, damp: float, block_size: int, compensate: bool, row_scale: bool,
                 column_loop: str, shared: bool) -> None:
        weight, H, widths, name = job.weight, job.H, job.widths, job.name
        out_f, in_f = weight.shape
        dev = weight.device
        if H.shape != (in_f, in_f):
            raise ValueError(f"{name}: Hessian has shape {tuple(H.shape)}, expected ({in_f}, {in_f})")
        if widths.shape != (in_f,):
            raise ValueError(f"{name}: {widths.numel()} channel widths for {in_f} input channels")
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}: weight holds NaN or Inf; refusing to quantize")
        if not torch.isfinite(H).all():
            raise ValueError(f"{name}: Hessian holds NaN or Inf (did calibration overflow?)")
        self.out_f, self.in_f, self.dev, self.n_sparse = out_f, in_f, dev, job.n_sparse
        self.block_size, self.compensate, self.shared, self.damp = block_size, compensate, shared, damp
        self.widths = widths = widths.to(dev).long()
        quantized = widths[widths != FP16]
        self.loop = _column_loop(column_loop, dev, 2 ** int(quantized.max()) if quantized.numel() else 1, block_size)
        W = weight.detach().float().clone()
        H = H.detach().to(device=dev, dtype=torch.float32).clone()
        self.diag = H.diagonal().clone()
        self.mean_diag = self.diag.mean()
        dead = self.diag == 0
        H.diagonal().masked_fill_(dead, 1.0)
        W.masked_fill_(dead, 0.0)
        rw = None if job.row_weight is None else mean_one_weights(job.row_weight, out_f, dev, name)
        self.scale = None
        if row_scale:
            W, rw, self.scale = scale_rows(W, rw)
            rw = mean_one_weights(rw, out_f, dev, name)  # a fit's scale is irrelevant; mean 1 as elsewhere
        self.W, self.H, self.rw = W, H, rw
        self.bits = sorted(set(widths.tolist()) - {FP16})
        self._init_cols: list[torch.Tensor] = []

    # -- initial codebooks (``initial_codebooks``, as requests) ------------------------------------
    def initial_fits(self) -> list[_Fit]:
        self._init_cols, fits = _initial_fits(self.W, self.widths, self.rw, self.shared)
        return fits

    def begin(self, fitted: list[torch.Tensor]) -> None:
        """The sparse outliers, the column order and the inverse Hessian, from the initial codebooks."""
        dev, W, in_f, out_f = self.dev, self.W, self.in_f, self.out_f
        init = _initial_books(self.widths, self._init_cols, fitted, self.shared)
        rows, cols = select_sparse(W, self.diag, init, self.n_sparse, self.rw)
        start = torch.zeros(in_f, max([2**b for b in init] or [1]), device=dev)  # warm start per column
        for b, (c, cb) in init.items():
            start[c, : 2**b] = cb
        exact = torch.zeros(out_f, in_f, dtype=torch.bool, device=dev)
        exact[rows, cols] = True
        fp = self.widths == FP16
        exact[:, fp] = True
        perm = torch.argsort(torch.where(fp, -1.0, self.diag), descending=True, stable=True)  # FP16 last
        self.W, self.exact, self.wp, self.start = W[:, perm], exact[:, perm], self.widths[perm], start[perm]
        self.Hinv = _inverse_hessian_cholesky(self.H[perm][:, perm], self.damp, self.mean_diag) if self.compensate else None
        self.H = None
        self.perm, self.rows, self.cols, self.fp = perm, rows, cols, fp
        self.Q = torch.empty_like(self.W)
        self.idx = torch.zeros(out_f, in_f, dtype=torch.uint8, device=dev)
        wp = self.wp
        self.kmax = 2 ** int(wp[~(wp == FP16)].max()) if (wp != FP16).any() else 1
        # FP16 columns sort last, so each lazy block's quantized columns are a prefix of it: known
        # here, where a ``nonzero`` per block and layer would wait for the device
        self.n_quant = int((wp != FP16).sum())
        self.books = torch.zeros(in_f, self.kmax, device=dev)  # per permuted column, ascending, padded

    # -- one lazy block -----------------------------------------------------------------------------
    def block_fits(self, i1: int) -> list[_Fit]:
        """The block's refits: one request for every width (on a GPU, ``share_runs``): a codebook of
        k < kmax entries is padded with +inf, which k-means treats as absent, so each column's Lloyd
        run is the one it would have alone, and the block costs one run's launches instead of one
        per width. Warm-started from the initial codebooks."""
        i2 = min(i1 + self.block_size, self.in_f)
        self._W1 = W1 = self.W[:, i1:i2].T.contiguous()  # [count, out]: column i is row i
        self._EX = EX = self.exact[:, i1:i2].T
        wb = self.wp[i1:i2]
        if self.shared:
            n = max(0, min(i2, self.n_quant) - i1)
            self._runs = [torch.arange(n, device=self.dev)] if n else []
        else:
            self._runs = [r for r in [(wb == b).nonzero().squeeze(1) for b in sorted(set(wb.tolist()) - {FP16})]
                          if r.numel()]
        fits = []
        for r in self._runs:
            k = 2 ** wb[r]
            kr = self.kmax if self.shared else int(k[0])
            slot = torch.arange(kr, device=self.dev)[None, :]
            init = torch.where(slot < k[:, None], self.start[i1:i2][r, :kr], torch.inf)
            fits.append(_Fit(W1[r], k, kr, self.rw, keep=~EX[r], init=init))
        return fits

    def padded(self, i1: int, fitted: list[torch.Tensor]) -> list[torch.Tensor]:
        """The block's fitted codebooks with the slots past each channel's size repeating its last
        entry: what ``storable`` rounds (a repeated entry moves neither the row's minimum nor maximum,
        so the real entries round as they would alone)."""
        wb = self.wp[i1:min(i1 + self.block_size, self.in_f)]
        out = []
        for r, cb in zip(self._runs, fitted):
            k = (2 ** wb[r])[:, None]
            slot = torch.arange(cb.shape[1], device=self.dev)[None, :]
            out.append(torch.where(slot < k, cb, cb.gather(1, k - 1)))
        return out

    def end_block(self, i1: int, books: list[torch.Tensor]) -> None:
        """Store the block's codebooks (``storable(padded(...))``, which a group rounds for all its
        layers in one call: ``_round_together``), walk its columns (error feedback), update the later
        columns."""
        i2 = min(i1 + self.block_size, self.in_f)
        count, kmax, dev = i2 - i1, self.kmax, self.dev
        W1, EX, wb = self._W1, self._EX, self.wp[i1:i2]
        mids = torch.full((count, max(kmax - 1, 1)), torch.inf, device=dev)
        cent = torch.zeros(count, kmax, device=dev)
        for r, cb in zip(self._runs, books):
            k = (2 ** wb[r])[:, None]
            kr = cb.shape[1]
            slot = torch.arange(kr, device=dev)[None, :]
            cent[r, :kr] = cb  # pads are never selected (mids are inf there); they keep gathers in range
            cent[r, kr:] = cb[:, -1:]
            mids[r, : kr - 1] = torch.where(slot[:, 1:] < k, (cb[:, 1:] + cb[:, :-1]) * 0.5, torch.inf)
        self.books[i1:i2] = cent
        if not self.compensate:
            j = torch.searchsorted(mids, W1, right=True).clamp(max=kmax - 1)
            self.Q[:, i1:i2] = torch.where(EX, W1, cent.gather(1, j)).T
            self.idx[:, i1:i2] = j.T.to(torch.uint8)
            return
        Hinv1 = self.Hinv[i1:i2, i1:i2]
        # The per-column step is launch-bound (one column is tiny): on a GPU the whole block's loop is
        # one Triton launch (cmpq.kernels.feedback). Exact weights are kept at their updated value (the
        # FP16 rounding at packing is ~1e-3 relative and left uncompensated).
        Q1, E1, J1 = self.loop(W1, EX, mids, cent, Hinv1, Hinv1.diagonal().reciprocal())
        self.Q[:, i1:i2] = Q1.T
        self.idx[:, i1:i2] = J1.T.to(torch.uint8)
        if i2 < self.in_f:
            self.W[:, i2:] -= E1.T.contiguous() @ self.Hinv[i1:i2, i2:]

    def parts(self) -> QuantizedParts:
        in_f, widths = self.in_f, self.widths
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(in_f, device=self.dev)
        Q, idx, books = self.Q[:, inv], self.idx[:, inv], self.books[inv]
        groups = {}
        for b in self.bits:
            ch = (widths == b).nonzero().squeeze(1)
            groups[b] = (ch, idx[:, ch].contiguous(), books[ch, : 2**b].half())
        fp_ch = self.fp.nonzero().squeeze(1)
        order = torch.argsort(self.rows * in_f + self.cols)
        rows, cols = self.rows[order], self.cols[order]
        return QuantizedParts(
            out_features=self.out_f, in_features=in_f, groups=groups,
            outlier_channels=fp_ch, outlier_weight=Q[:, fp_ch].half(),
            sparse_rows=rows, sparse_cols=cols, sparse_vals=Q[rows, cols].half(),
            row_scale=None if self.scale is None else self.scale.half(),
        )


def quantize_compensated_group(
    jobs: list[LayerJob],
    kmeans_iters: int = 100,
    damp: float = 0.01,
    block_size: int = 128,
    compensate: bool = True,
    row_scale: bool = False,
    kmeans_swaps: int = 0,
    column_loop: str = "auto",
    shared_runs: bool | None = None,
) -> list[QuantizedParts]:
    """``quantize_compensated`` for layers of one shape at once (e.g. a block's q/k/v/o or gate/up):
    the same result for each as alone, with each k-means run shared by all of them (``_run_fits``),
    which divides the walk's k-means launches by the number of layers. Their working copies (the
    weight, its inverse Hessian, the result) are held together: the caller bounds the group's size."""
    if not jobs:
        return []
    shape = tuple(jobs[0].weight.shape)
    if any(tuple(j.weight.shape) != shape for j in jobs):
        raise ValueError(f"quantize_compensated_group: layers of different shapes {[tuple(j.weight.shape) for j in jobs]}")
    shared = share_runs(jobs[0].weight.device) if shared_runs is None else shared_runs
    passes = [_LayerPass(j, damp, block_size, compensate, row_scale, column_loop, shared) for j in jobs]

    def run(requests: list[list[_Fit]], iters: int, swaps: int) -> list[list[torch.Tensor]]:
        flat = [f for r in requests for f in r]
        done = _run_fits(flat, iters, swaps, shared) if flat else []
        out, i = [], 0
        for r in requests:
            out.append(done[i: i + len(r)])
            i += len(r)
        return out

    for p, fitted in zip(passes, run([p.initial_fits() for p in passes], kmeans_iters, kmeans_swaps)):
        p.begin(fitted)
    for i1 in range(0, shape[1], block_size):
        padded = [p.padded(i1, fitted) for p, fitted in zip(passes, run([p.block_fits(i1) for p in passes],
                                                                          REFIT_ITERS, 0))]
        for p, books in zip(passes, _round_together(padded)):
            p.end_block(i1, books)
    return [p.parts() for p in passes]


def _round_together(books: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """``[[storable(cb) for cb in layer] for layer in books]`` in one ``storable`` call.

    Rows round independently: each one's grid comes from its own minimum and maximum, and
    ``storable``'s extra rounds leave a row that has settled as it is. So stacking the rows (padded
    to the widest codebook by repeating each row's last entry, which moves neither bound) gives every
    row what it gets alone, while a group of layers pays one rounding per lazy block instead of one
    per layer: ~30 ATen calls each, launch-bound on a GPU (``studies/kmeans_launch_time.py``)."""
    flat = [cb for layer in books for cb in layer]
    if not flat:  # every column of the block is FP16
        return [[] for _ in books]
    width = max(cb.shape[1] for cb in flat)
    rounded = storable(torch.cat([torch.cat([cb, cb[:, -1:].expand(-1, width - cb.shape[1])], dim=1)
                                  for cb in flat]))
    parts = iter(rounded.split([cb.shape[0] for cb in flat]))
    return [[next(parts)[:, : cb.shape[1]] for cb in layer] for layer in books]


def layer_groups(linears: dict, copies: int = 1) -> list[list[str]]:
    """The block's linears (name -> ``nn.Linear``) in groups for ``quantize_compensated_group`` (and
    the allocation's ``layer_options_group``): same shape and device, in block order, each group's
    weights times ``copies`` (the copies one merged k-means run holds) at most
    ``kmeans.CHUNK_ELEMENTS`` (or one layer), so a merged run holds no more than one chunk, the bound
    the walk's memory estimate already assumes (``cmpq.model.memory``). On a 7B-shaped model with the
    GPU's raised chunk (2^28) that is q/k/v/o and gate/up; at the default chunk (2^25), pairs of the
    attention layers."""
    groups: list[list[str]] = []
    size: list[int] = []
    key_of: dict[tuple, int] = {}
    for name, lin in linears.items():
        key = (tuple(lin.weight.shape), lin.weight.device)
        g = key_of.get(key)
        if g is not None and (size[g] + lin.weight.numel()) * copies <= kmeans.CHUNK_ELEMENTS:  # read now: the walk may raise it
            groups[g].append(name)
            size[g] += lin.weight.numel()
            continue
        key_of[key] = len(groups)
        groups.append([name])
        size.append(lin.weight.numel())
    return groups


def quantize_compensated(
    weight: torch.Tensor,
    H: torch.Tensor,
    widths: torch.Tensor,
    n_sparse: int,
    kmeans_iters: int = 100,
    damp: float = 0.01,
    block_size: int = 128,
    compensate: bool = True,
    name: str = "weight",
    row_weight: torch.Tensor | None = None,
    row_scale: bool = False,
    kmeans_swaps: int = 0,
    column_loop: str = "auto",
    shared_runs: bool | None = None,
) -> QuantizedParts:
    """Quantize ``weight`` ``[out, in]`` with per-channel ``widths`` (``FP16``: keep the column) and
    Hessian ``H`` ``[in, in]``; ``compensate=False`` skips the error feedback (same codebooks and
    outliers, each column on its own) for ablations. ``row_weight`` ``[out]`` (positive) weights
    the output rows in every codebook fit and in the sparse-outlier choice: GPTQ's error feedback
    works row by row, so it is unchanged, but a codebook is shared by all rows of its channel.
    ``row_scale``: fit the rows divided by ``row_scales(weight)`` (returned in the parts).
    ``kmeans_swaps``: merge-and-split rounds of the initial codebooks (``kmeans_1d``).
    ``column_loop``: how a lazy block's columns are walked, ``"torch"`` (a Python loop, five kernels
    a column), ``"triton"`` (one launch a block; widths up to 4 bits, blocks up to 256 columns) or
    ``"auto"`` (Triton on CUDA when it is installed and the layer fits it); the two agree to float
    rounding. ``shared_runs``: one k-means run for all widths, initial fits and lazy-block refits
    (None: on a GPU, ``kmeans.share_runs``); the same codebooks either way."""
    job = LayerJob(weight, H, widths, n_sparse, name, row_weight)
    return quantize_compensated_group([job], kmeans_iters, damp, block_size, compensate, row_scale, kmeans_swaps,
                                      column_loop, shared_runs)[0]
