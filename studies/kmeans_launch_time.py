"""Time the compensated algorithm's k-means-heavy layer steps (the allocation's distortion,
``layer_options``, and ``quantize_compensated``) on SmolLM2-135M-shaped random layers, with the
current k-means and, given ``--before FILE`` (for example ``git show a1bb851:cmpq/algorithm/kmeans.py``
saved to a file), the one before the Lloyd runs were batched (2026-12-05). On a GPU these steps are launch-bound, so the time tracks
the number of kernel launches, not the FLOPs; the 2026-12-05 quality grid on an H200 could not
finish one default cell in 9 minutes.

    python studies/kmeans_launch_time.py [--device cuda] [--blocks 2] [--before OLD.py] [--out X.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import time
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cmpq.algorithm import kmeans
from cmpq.algorithm.budget import FP16
from cmpq.algorithm.compensated import quantize_compensated
from cmpq.algorithm.distortion import layer_options

SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}  # [out, in], one SmolLM2 block
SHAPES_7B = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
             "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}  # one Llama-2-7B block


def layers(blocks: int, dev: torch.device, shapes: dict = SHAPES):
    g = torch.Generator().manual_seed(0)
    for _ in range(blocks):
        for name, (o, i) in shapes.items():
            w = (torch.distributions.StudentT(5.0).sample((o, i)) * 0.02).to(dev)
            x = torch.randn(max(512, i + 64), i, generator=g).to(dev) * (torch.rand(i, generator=g).to(dev) * 3 + 0.1)
            u = torch.rand(i, generator=g)
            widths = torch.where(u < 0.15, 2, torch.where(u < 0.75, 3, torch.where(u < 0.99, 4, FP16)))
            yield name, w, x.T @ x, widths


class OpCounter(TorchDispatchMode):
    """Counts ATen operator calls: on a GPU each is about one kernel launch (plus its Python cost)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.by_op: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.by_op[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def timed(fn, dev) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--before", default=None, help="an earlier cmpq/algorithm/kmeans.py to compare")
    ap.add_argument("--out", default=None)
    ap.add_argument("--variants", default="15:3,0", help="swaps:moves per batched run (kmeans.SWAP_BATCH), comma-separated")
    ap.add_argument("--column-loop", default="auto", choices=("auto", "torch", "triton"),
                    help="the compensated pass's column walk (quantize_compensated's column_loop)")
    ap.add_argument("--count", default=None, metavar="SHAPE", choices=("smollm2", "7b"),
                    help="only count ATen calls of the allocation and the compensated pass, layer by layer, for "
                         "one block of SHAPE (64 output rows: the count depends on the columns), as a CPU and "
                         "as a GPU runs them")
    ap.add_argument("--groups", default=None, metavar="SHAPE", choices=("smollm2", "7b"),
                    help="one block of SHAPE's compensated pass layer by layer vs in same-shape groups "
                         "(quantize_compensated_group): on CPU the ATen calls as a GPU makes them (64 output "
                         "rows), on --device cuda the seconds at full size")
    ap.add_argument("--lloyd", choices=("fused", "torch"), default="fused",
                    help="Lloyd's loop in one Triton launch on CUDA (kmeans.FUSED_LLOYD, the default) or the "
                         "PyTorch loop; run once each way")
    a = ap.parse_args()
    kmeans.FUSED_LLOYD = "cuda" if a.lloyd == "fused" else "off"
    if a.count:
        return count_calls(SHAPES if a.count == "smollm2" else SHAPES_7B, a.out)
    if a.groups:
        return group_study(SHAPES if a.groups == "smollm2" else SHAPES_7B, torch.device(a.device), a.out)
    dev = torch.device(a.device)
    variants = []
    for v in a.variants.split(","):
        s, _, b = v.partition(":")
        variants.append((f"batched{b or ''}", None, int(s), int(b) if b else kmeans.SWAP_BATCH))
    if a.before:
        spec = importlib.util.spec_from_file_location("kmeans_before", a.before)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
        variants += [("before", before, 9, None), ("before", before, 0, None)]
    current = kmeans._kmeans_chunk
    data = list(layers(a.blocks, dev))
    rows = []
    default_batch = kmeans.SWAP_BATCH
    for label, mod, swaps, batch in variants:
        kmeans._kmeans_chunk = current if mod is None else mod._kmeans_chunk  # kmeans_1d looks it up per call
        kmeans.SWAP_BATCH = batch or default_batch
        try:
            counter = OpCounter()
            with counter:
                _, w, H, widths = data[-1]  # one down_proj-shaped layer: ops per layer step
                layer_options(w, torch.ones(w.shape[1], device=dev), (2, 3, 4), int(0.005 * w.numel()), 25, True,
                              None, True, swaps)
                alloc_ops = counter.ops
                quantize_compensated(w, H, widths, int(0.005 * w.numel()), 100, 0.01, 128, True, row_scale=True,
                                     kmeans_swaps=swaps, column_loop=a.column_loop)
                comp_ops = counter.ops - alloc_ops
            alloc = sum(timed(lambda: layer_options(w, torch.ones(w.shape[1], device=dev), (2, 3, 4),
                                                    int(0.005 * w.numel()), 25, True, None, True, swaps), dev)
                        for _, w, _, _ in data)
            comp = sum(timed(lambda: quantize_compensated(w, H, widths, int(0.005 * w.numel()), 100, 0.01, 128, True,
                                                          row_scale=True, kmeans_swaps=swaps,
                                                          column_loop=a.column_loop), dev)
                       for _, w, H, widths in data)
        finally:
            kmeans._kmeans_chunk, kmeans.SWAP_BATCH = current, default_batch
        row = {"kmeans": label, "swaps": swaps, "swap_batch": batch, "allocation_s_per_block": round(alloc / a.blocks, 3),
               "compensation_s_per_block": round(comp / a.blocks, 3),
               "aten_ops_allocation_down_proj": alloc_ops, "aten_ops_compensation_down_proj": comp_ops}
        rows.append(row)
        print(row, flush=True)
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "blocks": a.blocks, "column_loop": a.column_loop, "note": "SmolLM2-135M has 30 blocks", "rows": rows}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


@contextlib.contextmanager
def calls_inside(counter: OpCounter, module, name: str):
    """Route ``module.name`` (a function looked up at each call) through ``counter``; yields [ATen
    calls made inside it, its calls, those ATen calls by operator]."""
    ref, seen = getattr(module, name), [0, 0, collections.Counter()]

    def counted(*args, **kw):
        before, by_op = counter.ops, collections.Counter(counter.by_op)
        r = ref(*args, **kw)
        seen[0] += counter.ops - before
        seen[1] += 1
        seen[2].update(counter.by_op - by_op)
        return r

    setattr(module, name, counted)
    try:
        yield seen
    finally:
        setattr(module, name, ref)


def column_loop_counted(counter: OpCounter):
    """The compensated pass's PyTorch column loop through ``counter``, so a count can stand one
    Triton launch per lazy block (what a GPU run makes) for the loop's calls."""
    from cmpq.algorithm import compensated

    return calls_inside(counter, compensated, "column_feedback_reference")


def lloyd_counted(counter: OpCounter):
    """Lloyd's loop (``kmeans._run_lloyd``) through ``counter``: the calls that
    ``kmeans.FUSED_LLOYD`` turns into one Triton launch per loop."""
    return calls_inside(counter, kmeans, "_run_lloyd")


def count_calls(shapes: dict, out: str | None) -> None:
    """ATen calls (about one GPU launch each) per layer of one block, default k-means moves and row
    scales, CPU, 64 output rows (the count depends on the columns; the k-means chunk is scaled so a
    chunk holds as many rows as at full size): the allocation's distortion and
    the compensated pass, as a CPU runs them (one k-means run per width, the column loop in PyTorch)
    and as a GPU runs them (widths sharing one run, ``kmeans.share_runs``; the column loop one Triton
    launch per lazy block, counted as one call)."""
    from cmpq.algorithm import compensated, distortion
    from cmpq.model.memory import kmeans_chunk

    swaps = kmeans_default_swaps()
    rows = []
    for name, (o, i) in shapes.items():
        w, H, widths = next(layers(1, torch.device("cpu"), {name: (64, i)}))[1:]
        row = {"layer": name, "shape": [o, i]}
        for path, shared in (("cpu_path", False), ("gpu_path", True)):
            counter = OpCounter()
            saved = kmeans.share_runs
            kmeans.share_runs = compensated.share_runs = lambda device, s=shared: s
            # 64 rows stand for o: scale the k-means chunk so a chunk holds as many rows as at full size
            chunk = kmeans_chunk(max(1, kmeans.CHUNK_ELEMENTS * 64 // o))
            try:
                with chunk, counter, column_loop_counted(counter) as loop, lloyd_counted(counter) as lloyd:
                    distortion.layer_options(w, torch.ones(i), (2, 3, 4), int(0.005 * w.numel()), 25, True, None,
                                             True, swaps)
                    alloc = counter.ops
                    quantize_compensated(w, H, widths, int(0.005 * w.numel()), 100, 0.01, 128, True, row_scale=True,
                                         kmeans_swaps=swaps, column_loop="torch")
            finally:
                kmeans.share_runs = compensated.share_runs = saved
            comp = counter.ops - alloc
            row[path] = {"allocation": alloc,
                         "compensated": comp if path == "cpu_path" else comp - loop[0] + loop[1],
                         "of_which_column_loop": loop[0] if path == "cpu_path" else loop[1],
                         "of_which_lloyd_loop": lloyd[0], "lloyd_loops": lloyd[1]}
            if path == "gpu_path":  # the calls left once Lloyd's loop and the column loop are one launch each
                # (the key predates the column loop's share being taken out too)
                row[path]["by_op_outside_lloyd"] = dict((counter.by_op - lloyd[2] - loop[2]).most_common())
        rows.append(row)
        print(row, flush=True)
    tot = {p: {k: sum(r[p][k] for r in rows) for k in ("allocation", "compensated", "of_which_lloyd_loop", "lloyd_loops")}
           for p in ("cpu_path", "gpu_path")}
    left = sum((collections.Counter(r["gpu_path"]["by_op_outside_lloyd"]) for r in rows), collections.Counter())
    tot["gpu_path"]["top_ops_outside_lloyd"] = dict(left.most_common(15))
    print("block:", tot)
    res = {"device": f"cpu, {torch.get_num_threads()} threads", "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "torch": torch.__version__, "rows": rows, "block": tot,
           "note": "ATen calls counted on CPU, 64 output rows; gpu_path: the calls a GPU run makes (widths share "
                   "k-means runs, the column loop is one launch per lazy block); of_which_lloyd_loop: calls inside "
                   "Lloyd's loop, which kmeans.FUSED_LLOYD makes one launch per loop (lloyd_loops)"}
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def group_study(shapes: dict, dev: torch.device, out: str | None) -> None:
    """The compensated pass and the allocation's distortion of one block, layer by layer vs grouped
    by shape (``layer_groups`` at the chunk a GPU run raises to, 2^28). On CPU: ATen calls of the GPU path (widths share runs; the
    Triton column loop counted as one call per lazy block) with 64 output rows standing for each
    layer's rows (chunk scaled to match). On CUDA: the wall seconds at full size."""
    from cmpq.algorithm.compensated import LayerJob, layer_groups, quantize_compensated_group
    from cmpq.algorithm.distortion import layer_options_group
    from cmpq.model.memory import MAX_AUTO_CHUNK_ELEMENTS, kmeans_chunk

    swaps = kmeans_default_swaps()
    groups: dict[tuple, list[str]] = {}
    for name, shape in shapes.items():
        groups.setdefault(shape, []).append(name)  # every same-shape set fits one 2^28 chunk at 7B size
    kw = dict(kmeans_iters=100, damp=0.01, block_size=128, compensate=True, row_scale=True, kmeans_swaps=swaps)

    def jobs(names, rows, device):
        torch.manual_seed(0)  # layers() draws its weights from the global generator: same data per mode
        out_ = []
        for n in names:
            o, i = shapes[n]
            w, H, widths = next(layers(1, torch.device("cpu"), {n: (rows or o, i)}))[1:]
            out_.append(LayerJob(w.to(device), H.to(device), widths, int(0.005 * w.numel()), n))
        return out_

    rows_out, tot = [], {"layer_by_layer": 0, "grouped": 0}
    if dev.type == "cuda":  # warm-up: the Triton column loop compiles on its first call
        quantize_compensated_group(jobs(list(shapes)[:1], 256, dev), **kw)
    for shape, names in groups.items():
        row = {"layers": names, "shape": list(shape)}
        for mode in (("layer_by_layer", "grouped") if dev.type == "cpu" else ()):
            counter = OpCounter()
            with kmeans_chunk(max(1, MAX_AUTO_CHUNK_ELEMENTS * 64 // shape[0])), counter, \
                    column_loop_counted(counter) as loop:
                js = jobs(names, 64, torch.device("cpu"))
                for part in ([[j] for j in js] if mode == "layer_by_layer" else [js]):
                    quantize_compensated_group(part, column_loop="torch", shared_runs=True, **kw)
            row[mode] = counter.ops - loop[0] + loop[1]
            tot[mode] += row[mode]
            # the allocation's distortion (layer_options), its runs merged as plan_widths merges them
            saved, kmeans.share_runs = kmeans.share_runs, (lambda device: True)
            try:
                with kmeans_chunk(max(1, MAX_AUTO_CHUNK_ELEMENTS * 64 // shape[0])), OpCounter() as c2:
                    js = jobs(names, 64, torch.device("cpu"))
                    parts = [[j] for j in js] if mode == "layer_by_layer" else [
                        [js[names.index(n)] for n in part] for part in layer_groups(
                            {n: SimpleNamespace(weight=j.weight) for n, j in zip(names, js)}, 3)]
                    for part in parts:
                        layer_options_group([j.weight for j in part], [torch.ones(shape[1])] * len(part), (2, 3, 4),
                                            [j.n_sparse for j in part], 25, True, None, True, swaps)
            finally:
                kmeans.share_runs = saved
            row["alloc_" + mode] = c2.ops
            tot["alloc_" + mode] = tot.get("alloc_" + mode, 0) + c2.ops
        if dev.type == "cuda":
            with kmeans_chunk(MAX_AUTO_CHUNK_ELEMENTS):
                js = jobs(names, None, dev)
                row["layer_by_layer_s"] = round(sum(timed(lambda j=j: quantize_compensated_group([j], **kw), dev)
                                                    for j in js), 3)
                row["grouped_s"] = round(timed(lambda: quantize_compensated_group(js, **kw), dev), 3)
                ones = torch.ones(shape[1], device=dev)
                row["alloc_layer_by_layer_s"] = round(sum(timed(lambda j=j: layer_options_group(
                    [j.weight], [ones], (2, 3, 4), [j.n_sparse], 25, True, None, True, swaps), dev) for j in js), 3)
                parts = [[js[names.index(n)] for n in part] for part in layer_groups(
                    {n: SimpleNamespace(weight=j.weight) for n, j in zip(names, js)}, 3)]
                row["alloc_grouped_s"] = round(sum(timed(lambda p=p: layer_options_group(
                    [j.weight for j in p], [ones] * len(p), (2, 3, 4), [j.n_sparse for j in p], 25, True, None, True,
                    swaps), dev) for p in parts), 3)
        rows_out.append(row)
        print(row, flush=True)
    print("block:", tot)
    res = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads",
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "rows": rows_out, "block_calls": tot,
           "note": "ATen calls of the GPU path counted on CPU with 64 output rows (column loop = 1 call per lazy "
                   "block); seconds (CUDA only) at full size, chunk 2^28, after a warm-up call"}
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1)


def kmeans_default_swaps() -> int:
    from cmpq.config import CMPQConfig

    return CMPQConfig().kmeans_swaps


if __name__ == "__main__":
    main()
