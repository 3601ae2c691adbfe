"""GPU memory of the block walk: estimate it before any work, and fit it under ``--max-gpu-memory``.

The walk's peak is the largest of four phases (see ``walk_blocks`` and ``quantize_weights``):

- catch: everything but the blocks (embeddings, final norm, lm_head) + the caught hidden states;
- calibration forward: one block + hidden states + one batch's forward working set;
- quantize: one block + hidden states + float32 copies of the block's weights (the per-channel
  columns, and the padded concatenation ``_cluster`` builds) + the larger of the k-means chunk
  working set and the weight-outlier search of the largest layer (an error and a flat index per
  weight, twice while concatenating);
- rerun: the packed block + its dequantized weights (cached for the rerun) + hidden states + batch.

Hidden states cost nothing on the GPU when offloaded (one batch in and out at a time instead).
These are estimates from reading the code (bytes of the live tensors), not allocator measurements;
the allocator's fragmentation comes on top, hence ``HEADROOM``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch
from torch import nn

from cmpq.algorithm import kmeans
from cmpq.model.blocks import find_blocks

KMEANS_BYTES_PER_ELEMENT = 40  # _kmeans_chunk: x, keep, sorted values + int64 order, float64 prefix sums
OUTLIER_BYTES_PER_WEIGHT = 24  # quantize_weights' O_q search: float32 error + int64 index, listed then cat'ed
MIN_CHUNK_ELEMENTS = 1 << 20
# Without a cap, a GPU run raises the k-means chunk up to this while the whole walk stays under
# AUTO_CHUNK_SHARE of the card: on a GPU k-means is launch-bound, so fewer, larger chunks are faster
# (a 7B-shaped layer's three widths, 135 M values, are six runs at the default chunk and one at 2^28).
MAX_AUTO_CHUNK_ELEMENTS = 1 << 28
AUTO_CHUNK_SHARE = 0.5
HEADROOM = 1.10  # allocator rounding and fragmentation

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """``"8GiB"`` -> 8589934592. Binary (KiB, MiB, GiB, TiB; bare K/M/G/T too) and decimal (KB, MB, GB, TB) units."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 8GiB, 12GB, 7500MiB")
    return int(float(m.group(1)) * _UNITS[unit])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@dataclass
class WalkMemory:
    """Estimated bytes on the accelerator, by part and by phase."""

    rest: int  # parameters outside the blocks (on the device during the catch step only)
    block: int  # largest block's parameters in the compute dtype
    packed: int  # its CMPQ buffers (about 5 bits per weight with codebooks and outliers)
    hidden: int  # every caught hidden state; 0 when offloaded
    batch: int  # one batch: hidden in and out, the block's intermediate outputs, float32 stats input
    quant: int  # float32 copies of the block's weights while quantizing
    search: int  # max(k-means chunk, weight-outlier search of the largest layer)
    offload: bool
    chunk_elements: int

    @property
    def phases(self) -> dict[str, int]:
        return {
            "catch": self.rest + self.hidden + self.batch,
            "forward": self.block + self.hidden + self.batch,
            "quantize": self.block + self.hidden + self.quant + self.search,
            "rerun": self.block + self.packed + self.hidden + self.batch,
        }

    @property
    def total(self) -> int:
        return int(max(self.phases.values()) * HEADROOM)

    def describe(self) -> str:
        parts = (f"block {gib(self.block)}, hidden states {gib(self.hidden)}"
                 f"{' (offloaded)' if self.offload else ''}, batch {gib(self.batch)}, "
                 f"float32 weights {gib(self.quant)}, k-means/outlier search {gib(self.search)} "
                 f"(chunk {self.chunk_elements:,} values), non-block {gib(self.rest)}")
        peak = max(self.phases, key=self.phases.get)
        return f"{gib(self.total)} (peak in {peak}, x{HEADROOM} headroom): {parts}"


def largest_linear(model: nn.Module) -> int:
    """Weights of the largest linear in the model's decoder blocks (0 if none)."""
    _, blocks = find_blocks(model)
    return max((m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, nn.Linear)), default=0)


def estimate_walk_memory(model: nn.Module, nsamples: int, seqlen: int, batch_size: int, offload: bool = False,
                         chunk_elements: int | None = None, dtype: torch.dtype | None = None,
                         shared_widths: int = 1) -> WalkMemory:
    """Estimated accelerator memory of ``walk_blocks`` + CMPQ for ``model`` (works on a meta-device model).
    ``shared_widths``: how many copies of a layer one k-means run may hold (the compensated
    algorithm's widths share a run on a GPU when they fit one chunk: ``kmeans.share_runs``)."""
    _, blocks = find_blocks(model)
    dtype = dtype or next(blocks[0].parameters()).dtype
    es = torch.finfo(dtype).bits // 8
    chunk = chunk_elements or kmeans.CHUNK_ELEMENTS
    block_ids = {id(p) for p in blocks.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in block_ids) * es
    block_numel = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    largest = largest_linear(model)
    outs = max(sum(m.out_features for m in b.modules() if isinstance(m, nn.Linear)) for b in blocks)
    max_in = max((m.in_features for b in blocks for m in b.modules() if isinstance(m, nn.Linear)), default=0)
    hidden_size = model.get_input_embeddings().embedding_dim
    tokens = batch_size * seqlen
    return WalkMemory(
        rest=rest,
        block=block_numel * es,
        packed=block_numel * 5 // 8,
        hidden=0 if offload else nsamples * seqlen * hidden_size * es,
        batch=tokens * (2 * hidden_size + outs) * es + tokens * max_in * 4,
        quant=2 * block_numel * 4,
        search=max(min(chunk, largest * max(shared_widths, 1)) * KMEANS_BYTES_PER_ELEMENT,
                   largest * OUTLIER_BYTES_PER_WEIGHT),
        offload=offload,
        chunk_elements=chunk,
    )


class MemoryCapError(RuntimeError):
    """The walk cannot fit under the requested GPU memory cap."""


@dataclass
class MemoryPlan:
    offload: bool
    chunk_elements: int
    estimate: WalkMemory
    notes: list[str]


def plan_memory(model: nn.Module, cap: int, nsamples: int, seqlen: int, batch_size: int,
                offload: bool = False, dtype: torch.dtype | None = None, shared_widths: int = 1) -> MemoryPlan:
    """Fit the walk under ``cap`` bytes: as asked, else offload activations, else smaller k-means chunks, else refuse."""
    est = lambda off, chunk=None: estimate_walk_memory(model, nsamples, seqlen, batch_size, off, chunk, dtype,  # noqa: E731
                                                       shared_widths)
    e = est(offload)
    notes: list[str] = []
    if e.total <= cap:
        return MemoryPlan(offload, e.chunk_elements, e, notes)
    if not offload:
        e = est(True)
        notes.append(f"activations offloaded to the CPU (they need {gib(est(False).hidden)} on the GPU)")
        if e.total <= cap:
            return MemoryPlan(True, e.chunk_elements, e, notes)
    # Only the k-means chunk still shrinks: halve it until the quantize phase fits.
    chunk = e.chunk_elements
    while chunk > MIN_CHUNK_ELEMENTS and est(True, chunk).total > cap:
        chunk //= 2
    e = est(True, max(chunk, MIN_CHUNK_ELEMENTS))
    if e.total <= cap:
        notes.append(f"k-means chunk lowered to {e.chunk_elements:,} values")
        return MemoryPlan(True, e.chunk_elements, e, notes)
    raise MemoryCapError(
        f"the walk needs about {e.describe()}; that is {gib(e.total - cap)} over the {gib(cap)} cap even with "
        f"activations offloaded and the k-means chunk at {e.chunk_elements:,} values; "
        f"lower --calib-batch-size or raise --max-gpu-memory"
    )


def auto_chunk_elements(model: nn.Module, device_memory: int, nsamples: int, seqlen: int, batch_size: int,
                        offload: bool = False, dtype: torch.dtype | None = None, shared_widths: int = 1,
                        reserved: int = 0) -> int:
    """The k-means chunk for a GPU run without a memory cap: the largest power of two from
    ``kmeans.CHUNK_ELEMENTS`` up to ``MAX_AUTO_CHUNK_ELEMENTS`` whose walk estimate, plus ``reserved``
    bytes held beside it (the whole model, when it stays on the device: ``stays_resident``), stays under
    ``AUTO_CHUNK_SHARE`` of ``device_memory`` bytes; never below the default (results do not depend on
    it). It stops growing once a chunk holds the largest layer's shared copies: more buys nothing."""
    est = lambda c: estimate_walk_memory(model, nsamples, seqlen, batch_size, offload, c, dtype,  # noqa: E731
                                         shared_widths)
    chunk = kmeans.CHUNK_ELEMENTS
    need = largest_linear(model) * max(shared_widths, 1)  # the most values one run holds
    while chunk < min(MAX_AUTO_CHUNK_ELEMENTS, need) and \
            est(chunk * 2).total + reserved <= AUTO_CHUNK_SHARE * device_memory:
        chunk *= 2
    return chunk


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as they are stored now."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def stays_resident(model: nn.Module, device_memory: int, nsamples: int, seqlen: int, batch_size: int,
                   dtype: torch.dtype | None = None, shared_widths: int = 1) -> bool:
    """Whether the whole model should stay on the GPU from the start of a run to its end, instead of
    moving there for the sensitivity pass, back, and then one block at a time.

    The sensitivity pass and fine-tuning already need the whole model on the device; between them the
    walk moved it out and back in pieces: on a 7B-shaped model ~13.5 GB each way through pageable
    host memory. 11 s passed there between the sensitivity pass's last window and the end of its
    phase (H100, 2026-12-07, ``benchmarks/results/default-7b-lloyd-h100-log.txt``: 43.8 s against
    32.9 s): the move back, the statistics' copies and the teacher states' concatenation, not timed
    apart. Activations offloaded ask for a lean GPU, so the caller does not keep a model resident
    then. Staying costs the model's bytes beside the walk's own peak, so it is chosen only
    when both fit under ``AUTO_CHUNK_SHARE`` of the card (the rule the k-means chunk already follows);
    the quantized model, about a fifth of the size, moves home once at the end."""
    e = estimate_walk_memory(model, nsamples, seqlen, batch_size, False, None, dtype, shared_widths)
    return parameter_bytes(model) + e.total <= AUTO_CHUNK_SHARE * device_memory


@contextlib.contextmanager
def kmeans_chunk(elements: int | None):
    """Run with ``kmeans.CHUNK_ELEMENTS`` set to ``elements`` (None: as it is; results do not depend
    on it: rows are independent)."""
    old = kmeans.CHUNK_ELEMENTS
    kmeans.CHUNK_ELEMENTS = old if elements is None else elements
    try:
        yield
    finally:
        kmeans.CHUNK_ELEMENTS = old


def enforce_cap(device: torch.device, cap: int) -> None:
    """Make the caching allocator refuse to grow past ``cap`` on ``device`` (CUDA only)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
