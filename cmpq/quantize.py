"""``cmpq.quantize``: CMPQ on a whole Hugging Face causal LM, block by block."""

from __future__ import annotations

import contextlib
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from cmpq import __version__
from cmpq.algorithm import kmeans, phases
from cmpq.algorithm.layer import quantize_weights
from cmpq.config import CMPQConfig
from cmpq.data.tokens import Windows, calibration_windows
from cmpq.model.calibration import SquaredNorm, walk_blocks
from cmpq.model.experts import expand_fused_experts, fill_unrouted, sibling_key
from cmpq.model.blocks import mark_skipped, set_module
from cmpq.model.run_state import remember
from cmpq.model.memory import (AUTO_CHUNK_SHARE, auto_chunk_elements, enforce_cap, kmeans_chunk, parameter_bytes,
                               plan_memory, stays_resident)
from cmpq.nn.linear import CMPQLinear, pack_linear
from cmpq.options import RunOptions, merge_options
from cmpq.storage.io import FORMAT_VERSION


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_calibration(tokenizer, options: RunOptions) -> Windows:
    """The windows ``options.calib`` names: a data set name, a file path, a ``Windows``, or a token
    tensor ``[n, seqlen]``; drawn ones are ``options.nsamples`` x ``options.seqlen`` tokens, ``options.seed``."""
    calib = options.calib
    if isinstance(calib, Windows):
        return calib
    if isinstance(calib, torch.Tensor):
        return Windows(calib, f"user tokens {tuple(calib.shape)}")
    if tokenizer is None:
        raise ValueError("pass a tokenizer, or calibration tokens as a tensor [nsamples, seqlen]")
    if isinstance(calib, Path):
        return calibration_windows(tokenizer, "file", options.nsamples, options.seqlen, options.seed, path=str(calib))
    return calibration_windows(tokenizer, calib, options.nsamples, options.seqlen, options.seed)


@contextlib.contextmanager
def staying_on(model: nn.Module, device: torch.device | None, log=None):
    """The whole run with ``model`` on ``device`` (None: where it is), and back where it was after,
    also after an error (``cmpq.model.memory.stays_resident`` says when and why)."""
    home = next(model.parameters()).device
    if device is None or torch.device(device) == home:
        yield
        return
    if log:
        log(f"the model stays on {device} for the run ({parameter_bytes(model) / 2**30:.1f} GiB; "
            f"moved back to {home} at the end)")
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


def _install(block: nn.Module, name: str, lin: nn.Linear, parts) -> None:
    with phases.phase("packing", lin.weight.device):
        q = pack_linear(parts, lin.bias.data if lin.bias is not None else None)
    q.cache_dense = True  # the rerun of this block reuses the dequantized weight
    set_module(block, name, q)


def _paper_block(cfg: CMPQConfig, log=None):
    """The paper's step for one block: all its linears clustered together (``quantize_weights``)."""

    def quantize_block(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        fill_unrouted(stats, "sqsum", log, i)
        names = list(linears)
        all_parts = quantize_weights([linears[n].weight.data for n in names], [stats[n].sqsum for n in names], cfg,
                                     [f"block {i} {n}" for n in names])
        for name, parts in zip(names, all_parts):
            _install(block, name, linears[name], parts)

    return quantize_block


def _compensated_steps(model: nn.Module, windows: Windows, cfg: CMPQConfig, device: torch.device, log,
                       progress: bool = True, dist=None, teacher: bool = False):
    """Sensitivity pass and whole-model width plan, then the walk's statistics (token-weighted
    Hessians) and per-block step (``quantize_compensated``). With ``dist`` every process runs the
    sensitivity pass on all windows (each needs every token's weight) and all take rank 0's plan,
    so the budget holds however the ranks' floating point differs. ``teacher``: also return the
    fine-tuning's teacher states, recorded during the sensitivity pass (else None)."""
    from cmpq.algorithm.compensated import LayerJob, layer_groups, quantize_compensated_group
    from cmpq.model import sensitivity
    from cmpq.model.blocks import find_blocks, find_linears
    from cmpq.model.distill import recording_head_inputs
    from cmpq.model.calibration import WeightedHessian
    from cmpq.model.planning import algorithm1_widths, check_reachable, n_sparse, plan_widths

    if cfg.allocator == "distortion":
        check_reachable(model, cfg)  # before any work
    t0 = time.perf_counter()
    with recording_head_inputs(model) if teacher else contextlib.nullcontext() as heads:
        sens = sensitivity.measure(model, windows.ids, device, log, rows=cfg.row_weighting == "gradient",
                                   progress=progress)
    states = torch.cat(heads) if teacher else None
    phases.add("sensitivity", time.perf_counter() - t0)
    with phases.phase("allocation", device):
        hdiag = {k: s.hdiag for k, s in sens.items()}
        rows = {k: s.row_weight for k, s in sens.items()} if cfg.row_weighting == "gradient" else None
        if cfg.allocator == "distortion":
            plan = plan_widths(model, hdiag, cfg, device, log, rows)
        else:
            plan = {k: algorithm1_widths(h, cfg) for k, h in hdiag.items()}
        if dist is not None:
            plan = dist.broadcast_object({k: v.cpu() for k, v in plan.items()} if dist.main else None)
    _, blocks = find_blocks(model)
    key_of = {id(lin): (i, n) for i, b in enumerate(blocks) for n, lin in find_linears(b).items()}

    def make_stats(name: str, lin: nn.Linear) -> WeightedHessian:
        # experts see a routed subset of the tokens, in an order the walk does not share with the
        # sensitivity pass: their Hessians are unweighted
        weighted = cfg.token_weighting == "gradient" and sibling_key(name) is None
        tw = sens[key_of[id(lin)]].token_weight if weighted else None
        return WeightedHessian(lin.in_features, lin.weight.device, tw)

    def quantize_block(i: int, block: nn.Module, linears: dict, stats: dict) -> None:
        fill_unrouted(stats, "sum", log, i)
        for names in layer_groups(linears):  # layers of one shape share each k-means run
            jobs = [LayerJob(linears[n].weight.data, stats[n].H, plan[(i, n)], n_sparse(linears[n], cfg),
                             f"block {i} {n}", None if rows is None else rows[(i, n)]) for n in names]
            with phases.phase("compensation", linears[names[0]].weight.device):
                parts = quantize_compensated_group(
                    jobs, cfg.kmeans_iters, cfg.damp, cfg.block_size, cfg.compensate, row_scale=cfg.row_scale,
                    kmeans_swaps=cfg.kmeans_swaps)
            del jobs
            for n, p in zip(names, parts):
                stats[n].sum = None  # the Hessians can go before the next group's are built
                _install(block, n, linears[n], p)

    return make_stats, quantize_block, states


@torch.no_grad()
def quantize(
    model: nn.Module,
    tokenizer=None,
    config: CMPQConfig | None = None,
    options: RunOptions | None = None,
    **run_options,
) -> nn.Module:
    """Quantize every linear of every decoder block with CMPQ, in place; returns the model.

    ``config`` is the algorithm (``CMPQConfig``, saved with the model); how the run is carried out
    (calibration, device, checkpoints, memory, logging) is ``options`` (``RunOptions``) or, one by
    one, the same names as keywords: ``quantize(model, tok, cfg, calib="c4", device="cuda")`` equals
    ``quantize(model, tok, cfg, RunOptions(calib="c4", device="cuda"))``. Passing both is refused.

    Embeddings, norms and ``lm_head`` are left as they are. The algorithm settings, a calibration
    description and timings end up in ``model.config.quantization_config``.

    ``checkpoint_dir`` (the CLI uses ``<output>.partial``) gets every finished block; ``resume``
    continues from it. ``cmpq.save`` removes it once the model is saved. With ``dist`` (from
    ``distributed.init()`` in a torchrun process) this process is one of several (one per GPU) that
    quantize the model together; each computes on ``dist.device`` and ends with the same quantized
    model. Only rank 0 logs and writes the checkpoint; save from rank 0 alone. See ``RunOptions``
    and ``cmpq.model.distributed``.
    """
    cfg = config or CMPQConfig()
    if not isinstance(cfg, CMPQConfig):
        raise TypeError(f"config must be a cmpq.CMPQConfig, got {type(cfg).__name__}")
    opts = merge_options(options, run_options)
    dist = opts.dist
    log = opts.log if dist is None or dist.main else None
    progress = opts.progress and log is not None
    device = opts.compute_device()
    if tokenizer is None and not isinstance(opts.calib, (Windows, torch.Tensor)):
        raise ValueError("pass a tokenizer, or calibration tokens as a tensor [nsamples, seqlen]")
    windows = resolve_calibration(tokenizer, opts)
    calibration = opts.calibration_record(windows)
    if log:
        log(f"calibration: {windows.description}")
    n_moe = expand_fused_experts(model)
    skipped = mark_skipped(model, cfg.skip_modules)
    if cfg.skip_modules and not skipped:
        raise ValueError(f"skip_modules {list(cfg.skip_modules)} match no linear in the decoder blocks")
    if skipped and log:
        log(f"left dense on request: {len(skipped)} linears ({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''})")
    if n_moe and log:
        log(f"{n_moe} mixture-of-experts layers: each expert's matrices are quantized as linears")
    if dist is not None:
        from cmpq.storage.checkpoint import tokens_sha256

        if len(set(dist.all_gather_object(tokens_sha256(windows.ids)))) != 1:
            raise RuntimeError("the processes drew different calibration tokens; give them the same data and seed")
        if log:
            log(f"{dist.world_size} processes ({device.type}), each runs 1/{dist.world_size} of the calibration "
                f"batches and quantizes its share of each block's linears")

    batch_size = opts.calib_batch_size
    offload_activations = opts.offload_activations
    chunk_elements = None  # None: kmeans.CHUNK_ELEMENTS as it is
    nsamples, seqlen = windows.ids.shape
    if dist is not None:  # each process holds the hidden states of its own batches only
        n_batches = -(-nsamples // batch_size)
        nsamples = min(nsamples, -(-n_batches // dist.world_size) * batch_size)
    # how many widths of a layer one k-means run holds (kmeans.share_runs: GPU only)
    shared = len(cfg.widths) if cfg.algorithm == "compensated" and kmeans.share_runs(device) else 1
    if opts.max_gpu_memory is not None:
        cap = opts.max_gpu_memory
        plan = plan_memory(model, cap, nsamples, seqlen, batch_size, offload_activations, shared_widths=shared)
        offload_activations = plan.offload
        chunk_elements = plan.chunk_elements
        enforce_cap(device, cap)
        if log:
            log(f"GPU memory estimate {plan.estimate.describe()}" + "".join(f"; {n}" for n in plan.notes))
    resident = False
    if opts.max_gpu_memory is None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        # one process only (the multi-GPU walk places and shares blocks itself: cmpq.model.distributed),
        # and not when activations are offloaded: that asks for a lean GPU
        resident = dist is None and not offload_activations and stays_resident(
            model, total, nsamples, seqlen, batch_size, shared_widths=shared)
        chunk_elements = auto_chunk_elements(model, total, nsamples, seqlen, batch_size, offload_activations,
                                             shared_widths=shared, reserved=parameter_bytes(model) if resident else 0)
        if log and chunk_elements != kmeans.CHUNK_ELEMENTS:
            log(f"k-means chunk raised to {chunk_elements:,} values (fewer launches; "
                f"the walk is estimated under {AUTO_CHUNK_SHARE:.0%} of the GPU's {total / 2**30:.0f} GiB)")

    start = time.perf_counter()
    # the checkpoint is opened before the model moves: its identity hashes every weight, which on the
    # host needs no copy back
    ckpt = None
    if opts.checkpoint_dir is not None:
        from cmpq.storage.checkpoint import BlockCheckpoint, run_identity

        identity = run_identity(model, cfg, calibration, windows, device)
        if dist is None:
            ckpt = BlockCheckpoint(opts.checkpoint_dir, identity, opts.resume)
        else:
            from cmpq.model.distributed import open_checkpoint

            ckpt = open_checkpoint(lambda: BlockCheckpoint(opts.checkpoint_dir, identity, opts.resume), dist)

    with staying_on(model, device if resident else None, log):
        phases.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        teacher = None
        finetune_s = 0.0
        wants_teacher = bool(cfg.finetune_epochs) and (dist is None or dist.main)  # rank 0 fine-tunes, then shares
        make_stats = lambda name, lin: SquaredNorm(lin.in_features, lin.weight.device)  # noqa: E731
        if cfg.algorithm == "compensated":  # the teacher states come from its sensitivity pass
            with kmeans_chunk(chunk_elements):  # the allocation clusters under the walk's chunk
                make_stats, quantize_block, teacher = _compensated_steps(model, windows, cfg, device, log, progress,
                                                                         dist, teacher=wants_teacher)
        else:
            if wants_teacher:
                from cmpq.model.distill import teacher_states

                t0 = time.perf_counter()
                teacher = teacher_states(model, windows.ids, device, progress=progress)
                finetune_s = time.perf_counter() - t0
            quantize_block = _paper_block(cfg, log)

        with kmeans_chunk(chunk_elements):
            times = walk_blocks(
                model,
                windows.ids,
                make_stats,
                quantize_block,
                device=device,
                batch_size=batch_size,
                log=log,
                offload_activations=offload_activations,
                checkpoint=ckpt,
                dist=dist,
                progress=progress,
            )
        tuned = None
        if teacher is not None:
            from cmpq.model.distill import finetune

            t0 = time.perf_counter()
            tuned = finetune(model, windows.ids, teacher, device, cfg.finetune_epochs, cfg.finetune_lr, log,
                             progress=progress)
            finetune_s += time.perf_counter() - t0
        if cfg.finetune_epochs and dist is not None:
            from cmpq.model.blocks import find_blocks
            from cmpq.model.distributed import sync_modules

            home = next(model.parameters()).device
            for block in find_blocks(model)[1]:  # every rank takes rank 0's fine-tuned layers
                sync_modules(block, {n: 0 for n, m in block.named_modules() if isinstance(m, CMPQLinear)}, dist, home)
    total = time.perf_counter() - start
    qc = {
        "quant_method": "cmpq",
        "format_version": FORMAT_VERSION,
        "cmpq_version": __version__,
        **{k: v for k, v in cfg.to_dict().items() if k != "extra"},
        "calibration": windows.description,  # what `cmpq info` shows
        "calibration_settings": calibration,  # the same, field by field (RunOptions.calibration_record)
        "quantize_seconds": round(total, 2),
        "time_split_seconds": {"catch": round(times.catch, 2), "forward": round(times.forward, 2),
                               **{k: round(v, 2) for k, v in times.extra.items()},
                               "quantize_linears": round(times.quantize, 2),
                               # this process's share of quantize_linears (allocation, kmeans, outlier_search, packing)
                               "linears_by_phase": {k: round(v, 2) for k, v in phases.totals().items()}},
    }
    if tuned is not None:
        qc["finetune"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in tuned.items()}
        qc["time_split_seconds"]["finetune"] = round(finetune_s, 2)
    if device.type == "cuda":
        qc["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if dist is not None:
        from cmpq.model.distributed import gather_floats

        qc["processes"] = dist.world_size
        if device.type == "cuda":
            per_rank = [round(v, 3) for v in gather_floats(qc["peak_gpu_memory_gib"], dist)]
            qc["peak_gpu_memory_gib"], qc["peak_gpu_memory_gib_per_process"] = max(per_rank), per_rank
    model.config.quantization_config = qc
    # for cmpq.save: the tokenizer to write, and the checkpoint to remove (rank 0's job when several ran)
    remember(model, tokenizer, ckpt.path if ckpt is not None and (dist is None or dist.main) else None)
    from cmpq.model.blocks import coverage

    frac, left = coverage(model)
    qc["quantized_fraction"] = round(frac, 6)
    from cmpq.storage.io import storage_dtype
    from cmpq.storage.layout import model_layout

    qc["storage_dtype"] = str(storage_dtype(model)).removeprefix("torch.")  # before from_pretrained recasts
    qc["layers"] = model_layout(model)  # the skeleton: what from_pretrained needs before any tensor
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        warnings.warn(f"cmpq left {len(left)} matrix parameter(s) inside the decoder blocks in full precision "
                      f"({100 * (1 - frac):.1f}% of the blocks' matrix weights): {shown}. They are not "
                      f"nn.Linear layers (e.g. fused mixture-of-experts weights), which cmpq does not "
                      f"quantize yet; the effective bits above count only the quantized linears",
                      stacklevel=2)
    if log:
        log(f"quantized {sum(isinstance(m, CMPQLinear) for m in model.modules())} linears in {total:.1f}s; "
            f"{100 * frac:.1f}% of the decoder blocks' matrix weights")
    return model
