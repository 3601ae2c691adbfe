"""Several processes quantizing one model together: one process per GPU of a host, ``torch.distributed``.

Launch with ``torchrun --nproc_per_node N -m cmpq.cli quantize ...`` (or ``cmpq quantize --nproc N``,
which starts that command). NCCL on GPUs, gloo on the CPU (``--device cpu``, as the tests do).
Every process (rank) loads the model on the CPU and walks the decoder blocks in lockstep with the
others, holding the current block on its own device (``cuda:LOCAL_RANK``):

1. Data parallel calibration: the calibration batches (the very batches one process would make) are
   split into contiguous ranges, one per rank; each rank catches and runs only its own batches, so
   it holds 1/N of the hidden states.
2. Statistics: each linear's per-batch activation sums of squares (float32, ``in_features`` values
   per batch) are all-gathered and added in the global batch order, so they are bit for bit what one
   process computes (a plain all-reduce would change the summation order).
3. Model parallel quantization: the block's linears are dealt to the ranks (largest first, each to
   the least loaded rank); each rank quantizes its own share.
4. Each rank broadcasts the layers it built (one flat byte buffer per rank), so every rank holds the
   same quantized block and reruns its batches through it.
5. Rank 0 alone writes: checkpoints (the hidden states are sent to it batch by batch) and the result.

Single-process runs never touch this module. With the same per-batch arithmetic (same kernels,
same thread count) the paper's algorithm gives a result byte-identical to a one-process run's, and a
checkpoint written by N processes resumes with any other number. The compensated algorithm's
Hessians are all-reduced instead (step 2 would move ``[in, in]`` per batch), so its result equals
one process's up to float rounding; its fine-tuning runs on rank 0, whose layers ``sync_modules``
then gives to every rank. The baselines (``--method gptq`` etc.) run in one process.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist
from torch import nn

from cmpq.model.blocks import set_module
from cmpq.storage.checkpoint import BlockCheckpoint


@dataclass
class Dist:
    """This process's place in the group: rank, group size, and the device it computes on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for collectives: the GPU under NCCL, the CPU under gloo."""
        return self.device if tdist.get_backend() == "nccl" else torch.device("cpu")

    # -- small helpers ---------------------------------------------------------------------------
    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of ``rank``'s contiguous share of ``n`` items (shares differ by at most one)."""
        r = self.rank if rank is None else rank
        return r * n // self.world_size, (r + 1) * n // self.world_size

    def broadcast_object(self, obj=None, src: int = 0):
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out


def launched() -> bool:
    """True inside a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str | torch.device | None = None) -> Dist:
    """Join the process group torchrun set up (``env://``): NCCL on ``cuda:LOCAL_RANK``, else gloo on the CPU.

    ``device``: None (CUDA when there is one), ``"cuda"`` or ``"cpu"``; an index given with
    ``cuda`` is ignored, each rank takes the GPU of its local rank.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise RuntimeError(f"local rank {local} has no GPU: this host shows {n} CUDA device(s); "
                               f"start at most {n} processes per host")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif kind == "cpu":
        dev, backend = torch.device("cpu"), "gloo"
    else:
        raise ValueError(f"several processes run on CUDA or the CPU, not {kind!r}")
    if not tdist.is_initialized():
        # ranks wait for each other while one quantizes a large layer or fine-tunes the model: give
        # collectives far longer than NCCL's default ten minutes before calling a rank lost
        tdist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(hours=3))
    return Dist(tdist.get_rank(), tdist.get_world_size(), dev)


def finish() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


# -- the walk's steps -----------------------------------------------------------------------------


def assign(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of each item: largest first, each to the least loaded rank (ties: lowest rank)."""
    load = [0] * world_size
    owner = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: equal sizes keep the block's order
        r = min(range(world_size), key=lambda k: load[k])
        owner[name] = r
        load[r] += sizes[name]
    return {n: owner[n] for n in sizes}


def reduce_stats(stats: dict, dist: Dist) -> None:
    """Combine every rank's statistics in place, so that all ranks hold the whole calibration's.

    Each ``SquaredNorm`` keeps one sum per batch (``parts``); these are all-gathered and added in the
    global batch order, exactly as one process adds them, so the result is bit for bit the same.
    ``WeightedHessian`` sums (the compensated algorithm's ``[in, in]`` Hessians) are all-reduced: the
    same on every rank, though not bit for bit one process's sum (its order of additions differs).
    Other statistics are refused (the baselines run in one process).
    """
    from cmpq.model.calibration import SquaredNorm, WeightedHessian

    cdev = dist.comm_device
    for n, s in stats.items():  # Hessians (the compensated algorithm): summed, in the order the collective adds
        if isinstance(s, WeightedHessian):
            total = s.sum.to(cdev)
            tdist.all_reduce(total)
            s.sum = total.to(s.sum.device)
            s.tokens = _all_sum(s.tokens, cdev)
    names = [n for n in stats if not isinstance(stats[n], WeightedHessian)]
    bad = [n for n in names if not isinstance(stats[n], SquaredNorm) or stats[n].parts is None]
    if bad:
        raise NotImplementedError(f"statistics of type {type(stats[bad[0]]).__name__} cannot be combined across "
                                  f"processes; run this method in one process")
    if not names:
        return
    counts = torch.tensor([len(stats[n].parts) for n in names], dtype=torch.int64, device=cdev)
    every = [torch.empty_like(counts) for _ in range(dist.world_size)]
    tdist.all_gather(every, counts)
    every = [c.tolist() for c in every]
    for j, n in enumerate(names):
        s = stats[n]
        most = max(c[j] for c in every)
        width = s.sqsum.numel()
        mine = torch.zeros(most, width, dtype=torch.float32, device=cdev)
        if s.parts:
            mine[: len(s.parts)] = torch.stack(s.parts).to(cdev)
        got = [torch.empty_like(mine) for _ in range(dist.world_size)]
        tdist.all_gather(got, mine)
        total = torch.zeros(width, dtype=torch.float32, device=s.sqsum.device)
        for r in range(dist.world_size):
            for k in range(every[r][j]):
                total += got[r][k].to(total.device)  # one add per batch, in batch order: as one process does
        s.sqsum = total
        s.tokens = _all_sum(s.tokens, cdev)
        s.parts = None


def _all_sum(x: int, cdev: torch.device) -> int:
    t = torch.tensor([x], dtype=torch.int64, device=cdev)
    tdist.all_reduce(t)
    return int(t.item())


def _describe(mod: nn.Module) -> dict:
    from cmpq.nn.linear import CMPQLinear

    meta: dict = {"tensors": [(k, tuple(t.shape), t.dtype) for k, t in mod.state_dict().items()]}
    if isinstance(mod, CMPQLinear):
        meta.update(kind="cmpq", args=(mod.in_features, mod.out_features, mod.counts(), mod.outlier_channels.numel(),
                                       mod.sparse_val.numel(), mod.bias is not None), cache_dense=mod.cache_dense,
                    row_scale=mod.row_scale is not None)  # format v4's per-row scales (the compensated default)
    else:
        meta["kind"] = "inplace"  # same module class as before (e.g. a fake-quantized nn.Linear): overwrite its tensors
    return meta


def _nbytes(shape: tuple, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _padded(n: int) -> int:
    return (n + 7) // 8 * 8  # keeps every piece 8-byte aligned inside the flat buffer


def sync_modules(root: nn.Module, owners: dict[str, int], dist: Dist, device: torch.device) -> None:
    """Every rank ends with the modules each owner built at ``owners``' names (one broadcast per owner)."""
    from cmpq.nn.linear import CMPQLinear

    mine = {n: _describe(root.get_submodule(n)) for n, r in owners.items() if r == dist.rank}
    metas: dict[str, dict] = {}
    for part in dist.all_gather_object(mine):
        metas.update(part)
    cdev = dist.comm_device
    for src in range(dist.world_size):
        names = [n for n in owners if owners[n] == src]
        if not names:
            continue
        layout = [(n, k, shape, dtype) for n in names for k, shape, dtype in metas[n]["tensors"]]
        total = sum(_padded(_nbytes(shape, dtype)) for _, _, shape, dtype in layout)
        if dist.rank == src:
            flat = torch.zeros(total, dtype=torch.uint8, device=cdev)
            off = 0
            for n, k, shape, dtype in layout:
                t = root.get_submodule(n).state_dict()[k]
                nb = _nbytes(shape, dtype)
                if nb:
                    flat[off : off + nb] = t.detach().contiguous().reshape(-1).view(torch.uint8).to(cdev)
                off += _padded(nb)
        else:
            flat = torch.empty(total, dtype=torch.uint8, device=cdev)
        if total:
            tdist.broadcast(flat, src=src)
        if dist.rank == src:
            continue
        off = 0
        built: dict[str, nn.Module] = {}
        for n in names:
            meta = metas[n]
            if meta["kind"] == "cmpq":
                built[n] = CMPQLinear(*meta["args"], device=device, row_scale=meta["row_scale"])
                built[n].cache_dense = meta["cache_dense"]
            else:
                built[n] = root.get_submodule(n)
        for n, k, shape, dtype in layout:
            nb = _nbytes(shape, dtype)
            t = flat[off : off + nb].view(dtype).reshape(shape).to(device).clone() if nb else \
                torch.empty(shape, dtype=dtype, device=device)
            off += _padded(nb)
            mod = built[n]
            if metas[n]["kind"] == "cmpq":
                owner_mod, _, attr = k.rpartition(".")
                holder = mod.get_submodule(owner_mod) if owner_mod else mod
                if attr in holder._buffers:
                    holder._buffers[attr] = t
                else:
                    holder._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                mod.state_dict()[k].copy_(t)
        for n in names:
            if metas[n]["kind"] == "cmpq":
                set_module(root, n, built[n])
        del flat


def gather_batches(local: list[torch.Tensor], dist: Dist) -> list[torch.Tensor] | None:
    """Rank 0 gets every rank's batches (on the CPU) in rank order, that is the global batch order; others get None."""
    shapes = dist.all_gather_object([(tuple(h.shape), h.dtype) for h in local])
    cdev = dist.comm_device
    if not dist.main:
        for h in local:
            tdist.send(h.to(cdev).contiguous(), dst=0)
        return None
    out = list(local)
    for src in range(1, dist.world_size):
        for shape, dtype in shapes[src]:
            buf = torch.empty(shape, dtype=dtype, device=cdev)
            tdist.recv(buf, src=src)
            out.append(buf.cpu())
    return out


def load_hidden_shard(checkpoint, lo: int, hi: int) -> list[torch.Tensor]:
    """Batches ``lo..hi-1`` of the newest checkpointed hidden states (reads only those)."""
    from safetensors import safe_open

    path = checkpoint._hidden_file(checkpoint.blocks_done - 1)
    with safe_open(str(path), framework="pt") as f:
        return [f.get_tensor(f"batch_{j:05d}") for j in range(lo, hi)]


def open_checkpoint(make: Callable[[], object], dist: Dist):
    """Rank 0 opens (or creates) the checkpoint folder; the others get a read-only view of it.

    An error on rank 0 (say, a mismatching ``.partial``) is raised on every rank, so none hangs.
    """
    from cmpq.storage.checkpoint import CheckpointMismatch

    ckpt, err = None, None
    if dist.main:
        try:
            ckpt = make()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    info = dist.broadcast_object((None if err is None else f"{type(err).__name__}: {err}",
                                  None if ckpt is None else (str(ckpt.path), ckpt.identity, ckpt.blocks_done)))
    if err is not None:
        raise err
    if info[0] is not None:
        raise CheckpointMismatch(f"rank 0: {info[0]}")
    if dist.main:
        return ckpt
    return FollowerCheckpoint(*info[1])


class FollowerCheckpoint(BlockCheckpoint):
    """What ranks other than 0 see of the checkpoint: where it is and how far it got; they never write."""

    def __init__(self, path: str, identity: dict, blocks_done: int) -> None:  # noqa: D107 - no files touched
        self.path = Path(path)
        self.identity = identity
        self.blocks_done = blocks_done

    def save(self, i, block, hidden) -> None:
        raise RuntimeError("only rank 0 writes the checkpoint")

    def remove(self) -> None:
        pass


def gather_floats(x: float, dist: Dist) -> list[float]:
    return [float(v) for v in dist.all_gather_object(float(x))]
