"""``cmpq`` command line: quantize, eval, info."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from cmpq.extras import MissingExtra


def _device(arg: str | None) -> torch.device:
    if arg:
        try:
            dev = torch.device(arg)
        except RuntimeError:
            raise ValueError(f"--device {arg!r} is not a device (cpu, cuda, cuda:1, ...)") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {arg}: this machine has no CUDA device (torch {torch.__version__}); use --device cpu")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {arg}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_DTYPE_LABEL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _positive(a: argparse.Namespace, *names: str, minimum: int = 1) -> None:
    """Refuse out-of-range integer options up front, naming the option."""
    for n in names:
        v = getattr(a, n, None)
        if v is not None and v < minimum:
            raise ValueError(f"--{n.replace('_', '-')} must be at least {minimum}, got {v}")


def is_cmpq_folder(path: str) -> bool:
    from cmpq.storage import io

    return io.is_cmpq_folder(path)


def load_any(name: str, device: torch.device, device_map: str | None = None, max_memory: str | None = None,
             verify: bool = True, dtype: torch.dtype | None = None):
    """(model, tokenizer, label) for a cmpq folder or anything ``load_model`` takes; ``dtype`` is the
    compute dtype (default float16 on GPU, float32 on CPU).

    ``device_map`` spreads the model over the GPUs with accelerate (``cmpq.model.device_map``); packed
    layers then stay packed (no dense cache: the point is a model too large for one GPU).
    """
    from transformers import AutoTokenizer

    import cmpq
    from cmpq.model.loading import load_model

    if is_cmpq_folder(name):
        from cmpq.nn.linear import cache_dense_weights

        if device_map is not None:
            model = cmpq.load(name, device_map=device_map, max_memory=max_memory, verify=verify, dtype=dtype)
        else:
            model = cmpq.load(name, device=device, verify=verify, dtype=dtype)
            cache_dense_weights(model)  # evaluation runs many windows: dequantize each layer once
        return model, AutoTokenizer.from_pretrained(name), "cmpq"
    if device_map is not None:
        from cmpq.model.device_map import dispatch

        dtype = dtype or (torch.float16 if torch.cuda.is_available() else torch.float32)
        model, tok = load_model(name, device="cpu", dtype=dtype)
        model = dispatch(model, device_map, max_memory)
        return model, tok, _DTYPE_LABEL[dtype]
    model, tok = load_model(name, device=device, dtype=dtype)
    base = getattr(model.config, "cmpq_baseline", None)
    if isinstance(base, dict):  # a fake-quantized baseline folder: a plain HF model
        return model, tok, f"{base.get('quant_method')} {base.get('bits')}-bit (fake-quantized)"
    return model, tok, _DTYPE_LABEL[next(model.parameters()).dtype]


def _quantize_baseline(a: argparse.Namespace, out: Path, device: torch.device) -> int:
    """Baselines leave fake-quantized weights: save a plain HF folder plus a ``cmpq_baseline`` report.

    The report goes in ``config.json`` under ``cmpq_baseline``, not ``quantization_config``, so
    transformers loads the folder as an ordinary model instead of looking for a quantizer.
    """
    from cmpq.baselines.runners import quantize_baseline
    from cmpq.model.loading import load_model

    model, tok = load_model(a.model, device="cpu", dtype=_compute_dtype(a, device))
    opts = {"act_order": True} if a.act_order else {}
    gs = None if a.group_size <= 0 else a.group_size
    report = quantize_baseline(model, tok, a.method, a.bits, group_size=gs, calib=a.calib, nsamples=a.nsamples,
                               seqlen=a.seqlen, seed=a.seed, device=device, batch_size=a.calib_batch_size, **opts)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None  # a GGUF source leaves its (non-serializable) loader; the weights are dense now
    from cmpq.storage.io import recover_debris, write_folder

    out = out.resolve()
    for line in recover_debris(out):
        print(f"warning: {line}", file=sys.stderr)
    write_folder(out, lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
    print(f"saved {out} ({a.method}, fake-quantized weights; effective bits per weight "
          f"{report['effective_bits']:.3f} if packed)")
    return 0


def _compute_dtype(a: argparse.Namespace, device: torch.device) -> torch.dtype:
    """``--dtype``, else float16 on GPU and float32 on CPU: the dtype the model is calibrated in."""
    if getattr(a, "dtype", None):
        return DTYPES[a.dtype]
    return torch.float16 if device.type == "cuda" else torch.float32


def _is_baseline_output(out: Path) -> bool:
    """A folder ``--method rtn|gptq|awq|...`` wrote (its config.json carries ``cmpq_baseline``)."""
    try:
        return "cmpq_baseline" in json.loads((out / "config.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    return out


def _spawn_torchrun(a: argparse.Namespace) -> int:
    """``cmpq quantize --nproc N ...`` = ``torchrun --standalone --nproc-per-node N -m cmpq.cli quantize ...``."""
    import subprocess

    from cmpq.model.memory import parse_bytes
    from cmpq.storage.checkpoint import partial_dir

    why = None
    if a.method != "cmpq":
        why = "--nproc is for --method cmpq; baselines run in one process"
    elif _device(a.device).type == "cuda" and a.nproc > torch.cuda.device_count():
        why = f"--nproc {a.nproc} but this host shows {torch.cuda.device_count()} GPU(s)"
    else:  # fail here, not in N processes at once
        why = _quantize_checks(a, Path(a.output), partial_dir(Path(a.output)),
                               parse_bytes(a.max_gpu_memory) if a.max_gpu_memory else None)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
           "-m", "cmpq.cli", *_strip_nproc(a.argv)]
    print("running: " + " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd)


def _quantize_checks(a: argparse.Namespace, out: Path, partial: Path, cap) -> str | None:
    """Why this quantize command cannot start, or None."""
    src = Path(a.model).expanduser()
    if src.exists() and (src.resolve() == out.resolve() or src.resolve().is_relative_to(out.resolve())):
        return f"the output {out} is (or holds) the input model; choose another output path"
    if out.exists() and not a.overwrite:
        return f"{out} exists; pass --overwrite to replace it"
    if out.exists():
        from cmpq.storage.io import check_replaceable

        try:
            if a.method == "cmpq" or not _is_baseline_output(out):
                check_replaceable(out.resolve())  # a cmpq output; for a baseline also a previous baseline's
        except FileExistsError as e:
            return str(e)
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write under {parent} (permission denied); choose another output path"
    if a.method != "cmpq":
        if a.resume or cap is not None or a.offload_activations:
            return "--resume, --max-gpu-memory and --offload-activations are for --method cmpq"
        return None
    if a.resume and a.no_checkpoint:
        return "--resume needs the checkpoint; drop --no-checkpoint"
    if partial.exists() and not a.resume:
        return (f"{partial} holds an unfinished run of this output; pass --resume to continue it, "
                f"or delete it to start over")
    return None


def cmd_quantize(a: argparse.Namespace) -> int:
    from cmpq.model import distributed

    if a.nproc > 1 and not distributed.launched():
        return _spawn_torchrun(a)
    if not distributed.launched():
        return _quantize(a, None)
    if a.method != "cmpq":
        print("error: several processes (torchrun) quantize with --method cmpq only; run baselines in one process",
              file=sys.stderr)
        return 2
    dist = distributed.init(a.device)
    try:
        return _quantize(a, dist)
    finally:
        distributed.finish()


def _check_model_input(a: argparse.Namespace) -> None:
    """Before loading any weights: the model is there, is not a quantized one, and has positions
    for ``--seqlen`` when calibration uses it (rtn and hqq take no calibration data)."""
    from cmpq.baselines.runners import CALIBRATED
    from cmpq.model.loading import refuse_quantized_folder, resolve_model_path, seqlen_problem

    refuse_quantized_folder(resolve_model_path(a.model)[0], a.model)
    too_long = seqlen_problem(a.model, a.seqlen) if a.method == "cmpq" or a.method in CALIBRATED else None
    if too_long:
        raise ValueError(too_long)


def _check_output_space(model, cfg, out: Path) -> None:
    """Refuse before quantizing when the output's file system cannot hold the result (sizes from
    ``cmpq.storage.estimate``, exact from shapes), rather than after hours of work."""
    from cmpq.storage.estimate import estimate
    from cmpq.storage.io import SPACE_MARGIN, check_free_space

    check_free_space(out.resolve().parent, estimate(model, cfg)["total_bytes"] + SPACE_MARGIN, f"the output {out}")


def _quantize(a: argparse.Namespace, dist) -> int:
    import cmpq
    from cmpq.model.loading import load_model
    from cmpq.model.memory import parse_bytes
    from cmpq.storage.checkpoint import partial_dir

    out = Path(a.output)
    cap = parse_bytes(a.max_gpu_memory) if a.max_gpu_memory else None  # bad strings fail before loading
    partial = partial_dir(out)
    why = _quantize_checks(a, out, partial, cap)
    if dist is not None:  # rank 0 decides, before any rank can have written anything
        why = dist.broadcast_object(why)
    if why:
        if dist is None or dist.main:
            print(f"error: {why}", file=sys.stderr)
        return 2
    if a.method != "cmpq":
        _check_model_input(a)
        return _quantize_baseline(a, out, _device(a.device))
    cfg = cmpq.CMPQConfig(bits=a.bits, algorithm=a.algorithm, act_outlier_frac=a.act_outlier_frac,
                          weight_outlier_frac=a.weight_outlier_frac, quantizer=a.quantizer,
                          token_weighting=a.token_weighting, row_weighting=a.row_weighting,
                          compensate=not a.no_compensation, row_scale=False if a.no_row_scale else None,
                          finetune_epochs=a.finetune_epochs, skip_modules=tuple(a.skip_modules))
    device = dist.device if dist is not None else _device(a.device)
    options = cmpq.RunOptions(calib=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                              calib_batch_size=a.calib_batch_size, device=None if dist is not None else device,
                              checkpoint_dir=None if a.no_checkpoint else partial, resume=a.resume,
                              offload_activations=a.offload_activations, max_gpu_memory=cap, dist=dist,
                              progress=not a.no_progress)
    _check_model_input(a)
    model, tok = load_model(a.model, device="cpu", dtype=_compute_dtype(a, device))
    _check_output_space(model, cfg, out)
    cmpq.quantize(model, tok, cfg, options)
    if dist is not None and not dist.main:
        return 0  # every rank holds the same model; rank 0 writes it
    try:
        cmpq.save(model, out, tokenizer=tok, overwrite=a.overwrite)
    except OSError as e:
        if partial.exists():  # the work survives in the checkpoint: say how to get it back
            raise OSError(e.errno, f"{_os_message(e)}; the quantized blocks are kept in {partial}: free "
                                   f"some space and run the same command with --resume") from e
        raise
    print(f"saved {out}")
    return cmd_info(argparse.Namespace(model=str(out), layers=False, json=False))


def cmd_eval(a: argparse.Namespace) -> int:
    import time

    from cmpq.data.tokens import eval_windows
    from cmpq.eval.perplexity import perplexity

    if a.max_memory and not a.device_map:
        print("error: --max-memory goes with --device-map", file=sys.stderr)
        return 2
    _positive(a, "seqlen", minimum=2)  # a window needs a token to predict
    _positive(a, "batch_size", "max_windows")
    if a.device_map:
        from cmpq.model.device_map import parse_max_memory

        parse_max_memory(a.max_memory)  # bad strings fail before loading
    device = _device(a.device)
    from cmpq.model.loading import seqlen_problem

    too_long = seqlen_problem(a.model, a.seqlen)
    if too_long:
        raise ValueError(too_long)
    t0 = time.perf_counter()
    model, tok, kind = load_any(a.model, device, a.device_map, a.max_memory, verify=not a.no_verify,
                                dtype=DTYPES[a.dtype] if a.dtype else None)
    load_s = time.perf_counter() - t0
    where = str(device)
    if a.device_map:
        from cmpq.model.device_map import describe

        where = f"device map {describe(model.hf_device_map)}"
    results = {}
    t0 = time.perf_counter()
    for ds in a.datasets:
        w = eval_windows(tok, ds, a.seqlen, nsamples=a.max_windows)
        print(w.description)  # it starts with the data set's name
        t1 = time.perf_counter()
        results[ds] = {"ppl": perplexity(model, w.ids, a.batch_size, label=ds), "data": w.description,
                       "windows": int(w.ids.shape[0]), "seconds": round(time.perf_counter() - t1, 2)}
    eval_s = time.perf_counter() - t0
    print(f"\nmodel: {a.model} ({kind}) on {where}")
    for ds, r in results.items():
        print(f"{ds:>10}: {r['ppl']:.3f}")
    if a.json:
        rep = {"model": a.model, "kind": kind, "device": where, "results": results,
               "load_seconds": round(load_s, 2), "eval_seconds": round(eval_s, 2)}
        if a.device_map:
            rep["device_map"] = {k: str(v) for k, v in model.hf_device_map.items()}
        if torch.cuda.is_available():
            rep["peak_gpu_memory_gib"] = {f"cuda:{i}": round(torch.cuda.max_memory_allocated(i) / 2**30, 3)
                                          for i in range(torch.cuda.device_count())}
        Path(a.json).write_text(json.dumps(rep, indent=1))
    return 0


def cmd_lm_eval(a: argparse.Namespace) -> int:
    """lm-evaluation-harness tasks on a cmpq folder (or any model ``quantize`` takes)."""
    from cmpq.integrations.lm_eval import resolve_tasks, run_tasks, table

    _positive(a, "num_fewshot", minimum=0)
    _positive(a, "batch_size", "max_length")
    if a.limit is not None and a.limit <= 0:
        raise ValueError(f"--limit must be positive, got {a.limit:g}")
    resolve_tasks(a.tasks, a.include_path)  # a typo fails before the model loads
    model, tok, kind = load_any(a.model, _device(a.device), dtype=DTYPES[a.dtype] if a.dtype else None)
    res = run_tasks(model, tok, a.tasks, include_path=a.include_path, limit=a.limit, num_fewshot=a.num_fewshot,
                    batch_size=a.batch_size, max_length=a.max_length, seed=a.seed)
    print(f"model: {a.model} ({kind})")
    print(table(res))
    if a.json:
        rep = {"model": a.model, "kind": kind, "results": res["results"], "versions": res.get("versions"),
               "n-shot": res.get("n-shot"), "config": {"limit": a.limit, "num_fewshot": a.num_fewshot,
                                                       "batch_size": a.batch_size, "seed": a.seed}}
        Path(a.json).write_text(json.dumps(rep, indent=1, default=str))
    return 0


def cmd_estimate(a: argparse.Namespace) -> int:
    from cmpq.config import CMPQConfig
    from cmpq.model.loading import load_skeleton
    from cmpq.storage.estimate import estimate

    model = load_skeleton(a.model)
    rows = []
    for b in a.bits:
        cfg = CMPQConfig(bits=b, algorithm=a.algorithm, act_outlier_frac=a.act_outlier_frac,
                         weight_outlier_frac=a.weight_outlier_frac)
        rows.append({"bits": b, **estimate(model, cfg)})
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{a.model}: CMPQ storage by budget (exact counts from shapes; no weights read)")
    print(f"{'bits':>6} {'effective bits':>15} {'linears (MB)':>13} {'rest fp16 (MB)':>15} {'total (MB)':>11}")
    for r in rows:
        print(f"{r['bits']:>6g} {r['effective_bits']:>15.3f} {r['quantized_bytes'] / 1e6:>13.1f} "
              f"{r['other_fp16_bytes'] / 1e6:>15.1f} {r['total_bytes'] / 1e6:>11.1f}")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from cmpq.storage.io import FORMAT_VERSION, MANIFEST, bits_summary, folder_summary

    path = Path(a.model).expanduser()
    if not is_cmpq_folder(str(path)):
        print(f"error: {path} is not a cmpq model folder (no {MANIFEST}, no quant_method 'cmpq' in config.json)",
              file=sys.stderr)
        return 2
    qc, layers, weights_disk = folder_summary(path)
    bits = bits_summary(layers.values())
    n_w, nominal = bits["quantized_weights"], bits["nominal_bits"]
    widths = sorted({b for l in layers.values() for b in l["channels"]}, key=int)
    q_ch = {b: sum(l["channels"].get(b, 0) for l in layers.values()) for b in widths}
    kinds: dict[str, int] = {}
    for l in layers.values():
        for k, v in l["bytes"].items():
            kinds[k] = kinds.get(k, 0) + v
    qbytes = sum(kinds.values())
    disk = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    summary = {
        "model": str(path),
        "budget": qc.get("bits"),
        "nominal_bits": nominal,
        "effective_bits": bits["effective_bits"],
        "quantized_weights": n_w,
        "channels": q_ch,
        "outlier_channels": sum(l["outlier_channels"] for l in layers.values()),
        "sparse_outliers": sum(l["sparse_outliers"] for l in layers.values()),
        "bytes_by_kind": kinds,
        "quantized_layers_bytes": qbytes,
        "quantized_layers_fp16_bytes": 2 * n_w,
        "weights_file_bytes": weights_disk,
        "folder_bytes": disk,
        "calibration": qc.get("calibration"),
        "algorithm": qc.get("algorithm", "paper"),
        "quantized_fraction": qc.get("quantized_fraction"),
    }
    if a.json:
        print(json.dumps({"summary": summary, "layers": layers}, indent=1))
        return 0
    print(f"{path}  (cmpq format v{qc.get('format_version', FORMAT_VERSION)}, algorithm {summary['algorithm']}, budget {qc.get('bits')} "
          f"bits, quantizer {qc.get('quantizer')})")
    if summary["quantized_fraction"] is not None:
        print(f"decoder blocks' matrix weights quantized: {100 * summary['quantized_fraction']:.2f}%")
    print(f"calibration: {qc.get('calibration')}")
    print(f"quantized linears: {len(layers)}, {n_w:,} weights")
    print(f"nominal bits (paper's Avg. Bit): {nominal:.3f}")
    print(f"effective bits per weight (every byte counted): {summary['effective_bits']:.3f}")
    print(f"channels {'/'.join(widths)}-bit: {'/'.join(str(q_ch[b]) for b in widths)}, FP16 channels "
          f"{summary['outlier_channels']}, sparse outliers {summary['sparse_outliers']}")
    print("bytes: " + ", ".join(f"{k} {v:,}" for k, v in kinds.items()))
    print(f"quantized linears: {qbytes:,} B vs {2 * n_w:,} B in FP16 ({qbytes / (2 * n_w):.1%}); "
          f"weights file {weights_disk:,} B; folder {disk:,} B")
    if a.layers:
        print(f"\n{'layer':<48} {'shape':>12} {'2/3/4-bit channels':>20} {'out.ch':>6} {'sparse':>7} {'nom':>5} {'eff':>5}")
        for n, l in layers.items():
            c = l["channels"]
            print(f"{n:<48} {l['out_features']:>5}x{l['in_features']:<6} {c.get('2', 0):>6}/{c.get('3', 0)}/{c.get('4', 0):<6}"
                  f" {l['outlier_channels']:>6} {l['sparse_outliers']:>7} {l['nominal_bits']:>5.2f} {l['effective_bits']:>5.2f}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from transformers import TextStreamer

    from cmpq.generate import generate, load_for_generation

    if not a.prompt.strip():
        raise ValueError("the prompt is empty")
    _positive(a, "max_new_tokens")
    if a.temperature < 0 or not 0 < a.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1], got {a.temperature}, {a.top_p}")

    dev = _device(a.device)
    model, tok = load_for_generation(a.model, dev, DTYPES[a.dtype] if a.dtype else None, verify=not a.no_verify)
    chat = not a.no_chat and bool(getattr(tok, "chat_template", None))
    if not chat:
        print(a.prompt, end="", flush=True)  # a completion continues the prompt; a chat answer stands alone
    # text goes to stdout as it is made; the bar only when the text goes elsewhere (a file, a pipe)
    streamer = TextStreamer(tok, skip_special_tokens=True)
    g = generate(model, tok, a.prompt, a.max_new_tokens, chat=not a.no_chat, streamer=streamer,
                 temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                 cuda_graph=None if not a.no_cuda_graph else False, compile=a.compile, fuse=a.fuse,
                 progress=not sys.stdout.isatty())
    print(f"\n[{g.new_tokens} new tokens, prompt {g.prompt_tokens}{' (chat template)' if g.chat else ''}: "
          f"prefill {g.prefill_s * 1e3:.1f} ms, decode {g.speed()} on {dev}{', CUDA graph' if g.cuda_graph else ''}]",
          file=sys.stderr)
    return 0


NO_VERIFY = ("cmpq folders: skip the per-tensor SHA-256 check (about 1.9 s per GiB on one core); "
             "the structural checks of docs/format.md still run")


def cmpq_version() -> str:
    from cmpq import __version__

    return __version__


class DefaultsHelp(argparse.HelpFormatter):
    """Ends every option's help with its default, read off the parser (whose defaults come from
    ``CMPQConfig()`` and ``RunOptions()``): a number written once, in the dataclass, cannot drift
    from what the help says. Help that already says its default (a rule, not a value) is left as
    it is, as are flags (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if (not action.option_strings or "default" in text or d is None or d is argparse.SUPPRESS
                or action.nargs == 0):
            return text
        shown = (" ".join(map(str, d)) or "none") if isinstance(d, (list, tuple)) else str(d)
        return f"{text} (default: {shown.replace('%', '%%')})".strip()


def build_parser() -> argparse.ArgumentParser:
    from cmpq.config import CMPQConfig
    from cmpq.options import RunOptions

    D, R = CMPQConfig(), RunOptions()  # the one place defaults are kept
    p = argparse.ArgumentParser(prog="cmpq", description="Channel-wise Mixed-Precision Quantization for causal LMs",
                                formatter_class=DefaultsHelp)
    p.add_argument("--version", action="version", version=f"cmpq {cmpq_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, formatter_class=DefaultsHelp)

    q = command("quantize", "quantize a model and save it (CMPQ: packed; baselines: fake-quantized)")
    q.add_argument("model", help="hub id, local folder, .gguf file, or 'smollm2-135m'")
    q.add_argument("--method", choices=("cmpq", "rtn", "gptq", "awq", "llmmq", "hqq"), default="cmpq",
                   help="cmpq (packed save) or a baseline (saved as a plain HF model with fake-quantized weights)")
    q.add_argument("--bits", type=float, required=True,
                   help="cmpq: effective bits per weight of the quantized linears, every stored byte counted "
                        "(--algorithm paper: nominal average in [2, 4]); llmmq: average bits in [2, 4]; "
                        "rtn, gptq, awq, hqq: 2, 3 or 4")
    q.add_argument("--group-size", type=int, default=128, help="baselines' group size; 0 = one group per output row")
    q.add_argument("--act-order", action="store_true", help="gptq: process columns by decreasing Hessian diagonal")
    q.add_argument("--output", "-o", required=True, help="folder to write (refused if it exists, unless --overwrite)")
    # run options (cmpq.RunOptions)
    q.add_argument("--calib", default=R.calib, help="calibration text: c4 | wikitext2 | offline | path to .txt/.jsonl")
    q.add_argument("--nsamples", type=int, default=R.nsamples, help="calibration windows")
    q.add_argument("--seqlen", type=int, default=R.seqlen, help="tokens per calibration window")
    q.add_argument("--seed", type=int, default=R.seed, help="seed of the calibration window draw")
    q.add_argument("--calib-batch-size", type=int, default=R.calib_batch_size,
                   help="calibration windows per forward pass (sets the summation order: part of the run's identity)")
    # the algorithm (cmpq.CMPQConfig)
    q.add_argument("--algorithm", choices=("compensated", "paper"), default=D.algorithm,
                   help="compensated: GPTQ-order codebooks, whole-model allocation by measured loss, --bits is "
                        "effective bits (every byte counted); paper: the paper's method, --bits is nominal")
    q.add_argument("--token-weighting", choices=("gradient", "none"), default=D.token_weighting,
                   help="compensated: weight calibration tokens by output-gradient norm")
    q.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="dtype the model is calibrated in (default: float16 on GPU, float32 on CPU; packed "
                        "layers are stored the same either way)")
    q.add_argument("--row-weighting", choices=("gradient", "none"), default=D.row_weighting,
                   help="compensated: weight output rows in every codebook fit by their gradient energy "
                        "(SqueezeLLM-style)")
    q.add_argument("--no-compensation", action="store_true",
                   help=f"compensated: no error feedback, an ablation (default: error feedback {'on' if D.compensate else 'off'})")
    q.add_argument("--no-row-scale", action="store_true",
                   help=f"compensated: no FP16 scale per output row, an ablation (default: row scales "
                        f"{'on' if D.row_scale else 'off'})")
    q.add_argument("--finetune-epochs", type=int, default=None,
                   help="epochs of codebook fine-tuning against the full-precision model, indices fixed "
                        f"(default: {D.finetune_epochs} for compensated, "
                        f"{CMPQConfig(algorithm='paper').finetune_epochs} for paper)")
    q.add_argument("--skip-modules", nargs="+", default=list(D.skip_modules), metavar="PATTERN",
                   help="block linears to leave dense, fnmatch patterns over qualified names, e.g. "
                        "'*.mlp.down_proj' 'model.layers.0.*'")
    q.add_argument("--quantizer", choices=("kmeans", "uniform"), default=D.quantizer,
                   help="paper: non-uniform k-means codebooks or uniform min-max grids")
    q.add_argument("--act-outlier-frac", type=float, default=D.act_outlier_frac,
                   help="paper: fraction of input channels kept whole in FP16 (O_act)")
    q.add_argument("--weight-outlier-frac", type=float, default=D.weight_outlier_frac,
                   help="fraction of all weights kept in FP16 as sparse outliers (O_q)")
    # where and how it runs (cmpq.RunOptions)
    q.add_argument("--device", default=R.device, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    q.add_argument("--overwrite", action="store_true", help="replace a previous cmpq output at --output")
    q.add_argument("--resume", action="store_true",
                   help="continue a killed run from <output>.partial (same settings and calibration required)")
    q.add_argument("--no-checkpoint", action="store_true",
                   help="do not write <output>.partial after each block (saves the hidden-state writes; no --resume)")
    q.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU (pinned), one batch on the GPU at a time")
    q.add_argument("--max-gpu-memory", default=R.max_gpu_memory, metavar="SIZE",
                   help="cap GPU memory, e.g. 8GiB: offloads activations and shrinks k-means chunks as needed, "
                        "or refuses before any work (per GPU with --nproc; default: no cap)")
    q.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they show only when stderr is a terminal; CMPQ_PROGRESS=0 also turns them off)")
    q.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="quantize with N processes, one per GPU (starts torchrun --standalone --nproc-per-node N; "
                        "same as launching `torchrun --nproc-per-node N -m cmpq.cli quantize ...` yourself); "
                        "with --device cpu: N CPU processes (gloo)")
    q.set_defaults(fn=cmd_quantize)

    e = command("eval", "perplexity by the GPTQ protocol")
    e.add_argument("model", help="cmpq folder, or any model 'quantize' takes (evaluated unquantized)")
    e.add_argument("--datasets", nargs="+", default=["wikitext2", "c4"], help="wikitext2 c4 c4-random offline")
    e.add_argument("--seqlen", type=int, default=2048, help="tokens per evaluation window")
    e.add_argument("--max-windows", type=int, default=None,
                   help="evaluate only the first N windows, for quick runs (default: all)")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    e.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype of the unquantized parts (default: float16 on GPU, float32 on CPU)")
    e.add_argument("--device-map", default=None, metavar="MAP",
                   help="spread the model over the GPUs with accelerate: auto (= balanced), balanced, sequential, "
                        "or a JSON file/object {module: device}; for models larger than one GPU (default: one device)")
    e.add_argument("--max-memory", default=None, metavar="LIST",
                   help="with --device-map: memory per device for the weights, e.g. 0=20GiB,1=20GiB[,cpu=64GiB] "
                        "(default: what accelerate finds free)")
    e.add_argument("--json", default=None, help="also write results to this file")
    e.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
    e.set_defaults(fn=cmd_eval)

    gp = command("generate", "generate text with a KV cache (CUDA graphs on GPU), streamed; "
                             "chat template when the tokenizer has one; decode tokens/s")
    gp.add_argument("model", help="cmpq folder, or any model 'quantize' takes")
    gp.add_argument("prompt")
    gp.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    gp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gp.add_argument("--seed", type=int, default=0, help="sampling seed")
    gp.add_argument("--no-cuda-graph", action="store_true", help="decode without capturing a CUDA graph")
    gp.add_argument("--compile", action="store_true",
                    help="torch.compile the decode step first (fuses the model's small ops; tens of seconds once)")
    gp.add_argument("--fuse", action="store_true",
                    help="one kernel launch for the CMPQ linears that share an input (q/k/v, gate/up); "
                         "with --compile, inside the compiled step too")
    gp.add_argument("--no-chat", action="store_true",
                    help="feed the prompt as it is, not through the tokenizer's chat template")
    gp.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="compute dtype (default: float16 on GPU, float32 on CPU)")
    gp.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    gp.add_argument("--no-verify", action="store_true", help=NO_VERIFY)
    gp.set_defaults(fn=cmd_generate)

    le = command("lm-eval", "lm-evaluation-harness tasks on a cmpq folder (needs the lm-eval extra)")
    le.add_argument("model", help="cmpq folder, or any model 'quantize' takes (evaluated unquantized)")
    le.add_argument("--tasks", nargs="+", required=True, help="lm-eval task names, e.g. hellaswag arc_easy")
    le.add_argument("--include-path", default=None, metavar="DIR",
                    help="folder of extra task YAML files (local data sets; offline, the only tasks that run)")
    le.add_argument("--limit", type=float, default=None,
                    help="documents per task (an int) or a fraction (< 1) (default: all)")
    le.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    le.add_argument("--batch-size", type=int, default=1, help="requests per forward pass")
    le.add_argument("--max-length", type=int, default=None, help="context length (default: the model's)")
    le.add_argument("--seed", type=int, default=0, help="lm-eval's seeds")
    le.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    le.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                    help="compute dtype of the unquantized parts (default: float16 on GPU, float32 on CPU)")
    le.add_argument("--json", default=None, metavar="FILE", help="also write the results to this file")
    le.set_defaults(fn=cmd_lm_eval)

    es = command("estimate", "effective bits and size of a CMPQ model for given budgets, before quantizing")
    es.add_argument("model", help="hub id, local folder, .gguf file, or 'smollm2-135m' (no weights are read)")
    es.add_argument("--bits", type=float, nargs="+", default=[2, 2.5, 3, 3.5, 4], help="budgets to size")
    es.add_argument("--algorithm", choices=("compensated", "paper"), default=D.algorithm,
                    help="how --bits is read: effective (compensated) or nominal (paper)")
    es.add_argument("--act-outlier-frac", type=float, default=D.act_outlier_frac,
                    help="paper: fraction of input channels kept whole in FP16 (O_act)")
    es.add_argument("--weight-outlier-frac", type=float, default=D.weight_outlier_frac,
                    help="fraction of all weights kept in FP16 as sparse outliers (O_q)")
    es.add_argument("--json", action="store_true", help="print JSON instead of a table")
    es.set_defaults(fn=cmd_estimate)
    i = command("info", "bits per weight, per layer, storage breakdown")
    i.add_argument("model", help="cmpq folder")
    i.add_argument("--layers", action="store_true", help="one line per layer")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.fn(args)
    except BrokenPipeError:  # `cmpq info --json | head`: the reader left; not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - so the interpreter's final flush is quiet
        except OSError:
            pass
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, MissingExtra) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permissions, I/O errors: the system's words and the file
        print(f"error: {_os_message(e)}", file=sys.stderr)
        return 2


def _os_message(e: OSError) -> str:
    """``OSError(28, "No space left", "f")`` -> "No space left: f" (not "[Errno 28] ...")."""
    msg = e.strerror or str(e)
    return f"{msg}: {e.filename}" if e.filename else msg


if __name__ == "__main__":
    sys.exit(main())
