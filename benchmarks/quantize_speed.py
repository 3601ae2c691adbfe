"""Wall time and peak GPU memory of whole quantization runs on Llama-2-7B/13B-shaped random models
(issue 5), on one GPU or several (torch.distributed, one process per GPU), and of ``cmpq eval`` with
the quantized model spread over the GPUs (accelerate device_map).

Each shape is built once from its config with random weights and a character tokenizer, saved as
safetensors on local disk, and loaded back on the CPU as ``cmpq quantize`` does; CMPQ runs quantize
it (3 bits, random calibration tokens 128 x 2048) and save it. Reported per run: catch /
calibration forward / linear quantization (allocation, k-means, outlier search, packing, and with
several GPUs the exchange of finished layers) / checkpoint / save seconds, and peak GPU memory
(per GPU with several). ``--tiny`` runs every mode on a tiny shape on the CPU in seconds (two gloo
processes for the multi-process row), to check the script.

    python benchmarks/quantize_speed.py                       # one process: 7B and 13B, then 13B under 8 GiB
    python benchmarks/quantize_speed.py --tiny                # CPU smoke test of all modes
    python benchmarks/quantize_speed.py build --shape 7b --workdir W                 # the random model, once
    python benchmarks/quantize_speed.py row --shape 7b --workdir W --nproc 2 --append rows.jsonl   # 2 GPUs
    python benchmarks/quantize_speed.py row --shape 7b --workdir W --method gptq --append rows.jsonl
    python benchmarks/quantize_speed.py eval --shape 7b --workdir W --gpus 0,1 --append rows.jsonl

``row`` and ``eval`` append one JSON line each to ``--append`` when they end; device/device_scale.sh
runs the 1-vs-2-GPU set on the 2-GPU machine.
"""

from __future__ import annotations

import os
import sys
import argparse
import contextlib
import datetime
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {
    "tiny": dict(vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
}
TINY = dict(nsamples=4, seqlen=64, batch=2, bits=4.0)  # a tiny model's layers cannot reach 3 effective bits


def char_tokenizer():
    """Printable ASCII, one token per character (ids 32..126, 0 = unknown): enough for `cmpq eval --datasets offline`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i for i in range(32, 127)} | {"[UNK]": 0}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def build(shape: str, where: Path, dtype: torch.dtype) -> Path:
    """Random-weight model saved as safetensors (normal, std 0.02: the init scale of the real ones),
    with a character tokenizer. Built once per folder; drawn on the GPU when there is one (seconds
    instead of minutes for 7B)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = where / shape
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype=str(dtype).split(".")[1])
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to_empty(device="cpu")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = torch.ones(p.shape, dtype=dtype)
        else:
            p.data = (torch.randn(p.shape, generator=g, device=dev) * 0.02).to(dtype).cpu()
    model.model.rotary_emb.__init__(cfg)  # buffers were left empty by to_empty
    model.save_pretrained(path, safe_serialization=True)
    char_tokenizer().save_pretrained(path)
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _calibration(vocab: int, nsamples: int, seqlen: int) -> torch.Tensor:
    return torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))


_LOG_LISTENERS: list = []  # called with every log line after it is printed (``profiled_block``)


def _stamped(t0: float):
    """Log lines to stderr with the seconds since ``t0`` (the model load's start): a run cut off by
    its time limit still shows how far each phase got (the JSON row is written only at the end)."""
    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", file=sys.stderr, flush=True)
        for f in _LOG_LISTENERS:
            f(msg)
    return log


def run(path: Path, out: Path, device: torch.device, nsamples: int, seqlen: int, bits: float, batch: int,
        cap: str | None, offload: bool, checkpoint: bool = True, dist=None, algorithm: str = "compensated",
        finetune_epochs: int | None = None) -> dict | None:
    """One CMPQ run (load, quantize, save); with ``dist``, this process's part of it (None except on rank 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cmpq

    t0 = time.perf_counter()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tok = AutoTokenizer.from_pretrained(path) if (path / "tokenizer.json").is_file() else None
    load_s = time.perf_counter() - t0
    ids = _calibration(model.config.vocab_size, nsamples, seqlen)
    cfg = cmpq.CMPQConfig(bits=bits, algorithm=algorithm, finetune_epochs=finetune_epochs)
    options = cmpq.RunOptions(calib=ids, calib_batch_size=batch, device=None if dist is not None else device,
                              log=_stamped(t0), progress=False, offload_activations=offload, max_gpu_memory=cap, dist=dist,
                              checkpoint_dir=Path(str(out) + ".partial") if checkpoint else None)
    t0 = time.perf_counter()
    cmpq.quantize(model, None, cfg, options)
    quant_s = time.perf_counter() - t0
    if dist is not None and not dist.main:
        return None
    t0 = time.perf_counter()
    cmpq.save(model, out, tokenizer=tok, overwrite=True)
    save_s = time.perf_counter() - t0
    qc = model.config.quantization_config
    return {"method": "cmpq", "algorithm": algorithm, "finetune_epochs": cfg.finetune_epochs,
            "processes": qc.get("processes", 1), "load_s": round(load_s, 2),
            "quantize_s": round(quant_s, 2), "save_s": round(save_s, 2), "split_s": qc["time_split_seconds"],
            "peak_gpu_gib": qc.get("peak_gpu_memory_gib"),
            "peak_gpu_gib_per_process": qc.get("peak_gpu_memory_gib_per_process", [qc.get("peak_gpu_memory_gib")]),
            "max_gpu_memory": cap, "offload_activations": offload, "checkpoint": checkpoint, "output": str(out),
            "weights_file_gb": round((out / "model.safetensors").stat().st_size / 1e9, 3),
            "weights_sha256": _sha256(out / "model.safetensors")}


def run_baseline(path: Path, method: str, device: torch.device, nsamples: int, seqlen: int, bits: float,
                 batch: int) -> dict:
    """A baseline (RTN, GPTQ; group 128) on one device: load and quantize, no save (fake-quantized weights)."""
    from transformers import AutoModelForCausalLM

    from cmpq.baselines.runners import quantize_baseline

    t0 = time.perf_counter()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = _calibration(model.config.vocab_size, nsamples, seqlen)
    t0 = time.perf_counter()
    rep = quantize_baseline(model, None, method, int(bits), group_size=128, calib=ids, nsamples=nsamples,
                            seqlen=seqlen, device=device, log=None, batch_size=batch)
    quant_s = time.perf_counter() - t0
    peak = rep.get("peak_gpu_memory_gib")
    return {"method": method, "processes": 1, "load_s": round(load_s, 2), "quantize_s": round(quant_s, 2),
            "peak_gpu_gib": None if peak is None else round(peak, 3), "effective_bits": round(rep["effective_bits"], 4)}


# -- modes ---------------------------------------------------------------------------------------


def _env_info(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"date": datetime.date.today().isoformat(), "device": name,
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "torch": torch.__version__, "transformers": transformers.__version__}


def _append(path: str | None, row: dict) -> None:
    print(json.dumps(row), flush=True)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


class _ProfileWindow:
    """One torch.profiler window opened and closed from inside a run (the GPU synced at both ends);
    its table is printed after the run, so its processing stays out of the timed part."""

    def __init__(self) -> None:
        self.prof = self.done = None
        self.t0 = self.wall = 0.0

    def open(self) -> None:
        torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                       torch.profiler.ProfilerActivity.CUDA])
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def close(self, units: int = 1) -> None:
        torch.cuda.synchronize()
        self.wall = (time.perf_counter() - self.t0) / units
        self.done, self.prof = self.prof, None
        self.done.__exit__(None, None, None)

    def report(self, title: str, rows: int = 25) -> None:
        if self.done is not None:
            print(title.format(wall=self.wall), flush=True)
            print(self.done.key_averages().table(sort_by="self_device_time_total", row_limit=rows), flush=True)


@contextlib.contextmanager
def _profiled_calls(owner, name: str, count: int, start: int, title: str):
    """torch.profiler from the ``start``-th call of ``owner.name`` (looked up at each call) to the
    ``start + count``-th, so the window covers ``count`` whole units of the run between them."""
    if count <= 0:
        yield
        return
    original, n, win = getattr(owner, name), [0], _ProfileWindow()

    def counted(*args, **kw):
        n[0] += 1
        if n[0] == start:
            win.open()
        elif n[0] == start + count and win.prof is not None:
            win.close(count)
        return original(*args, **kw)

    setattr(owner, name, counted)
    try:
        yield
    finally:
        setattr(owner, name, original)
        win.report(title)


def profiled_finetune(steps: int, start: int = 40):
    """torch.profiler over ``steps`` codebook fine-tuning steps (0: off), from the ``start``-th KL
    evaluation on (the first 16 or so are the held-out windows before training); the profiled steps
    run slower, ~1 s on a 7B run. Why: a 7B step takes 0.31 s against ~0.15 s of dense GEMMs (H100,
    2026-12-07), and the device machine has no nsys to say where the rest goes."""
    from cmpq.model import distill

    return _profiled_calls(distill, "_kl", steps, start,
                           f"profiled {steps} fine-tuning steps: {{wall:.3f}} s a step (profiler on)")


def profiled_sensitivity(windows: int, start: int = 40):
    """torch.profiler over ``windows`` windows of the sensitivity pass (0: off), from the ``start``-th
    on: it opens at that window's loss and closes at a later one's, so it covers whole windows (one
    forward and backward each). Why: the pass takes ~31 s of a 7B run (H100, 2026-12-07) against
    ~10 s of GEMMs by FLOP count."""
    import torch.nn.functional as F

    return _profiled_calls(F, "cross_entropy", windows, start,
                           f"profiled {windows} sensitivity windows: {{wall:.3f}} s a window (profiler on)")


@contextlib.contextmanager
def profiled_block(block: int):
    """With ``block`` > 0: torch.profiler over the walk's block ``block`` (1-based), from the log line
    that ends the block before it to the one that ends it: its hooked forward with the Hessian
    products, its quantization and its rerun. Why: the walk's forwards take ~34 s of a 7B run (H100,
    2026-12-07) against ~20 s by FLOP count."""
    if block <= 0:
        yield
        return
    win = _ProfileWindow()

    def listen(msg: str) -> None:
        if msg.startswith(f"block {block - 1}/") or (block == 1 and msg.startswith("allocation:")):
            win.open()
        elif msg.startswith(f"block {block}/") and win.prof is not None:
            win.close()

    _LOG_LISTENERS.append(listen)
    try:
        yield
    finally:
        _LOG_LISTENERS.remove(listen)
        win.report(f"profiled block {block} of the walk")


def _strip(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == flag:
            skip = True
        elif not x.startswith(flag + "="):
            out.append(x)
    return out


def _q_out(work: Path, shape: str, nproc: int, cap: str | None) -> Path:
    return work / f"{shape}-q-p{nproc}{'-capped' if cap else ''}"


def mode_build(a) -> None:
    device = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
    t0 = time.perf_counter()
    path = build(a.shape, Path(a.workdir), torch.float16 if device.type == "cuda" else torch.float32)
    print(f"built {path} in {time.perf_counter() - t0:.1f}s", flush=True)


def mode_row(a, argv: list[str]) -> None:
    from cmpq.model import distributed

    if a.nproc > 1 and not distributed.launched():  # start one process per GPU and wait for them
        if a.method != "cmpq":
            raise SystemExit("several processes: --method cmpq only")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}",
               os.path.abspath(__file__), *_strip(argv, "--nproc")]
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, env={**os.environ, "CMPQ_BENCH_NPROC": str(a.nproc),
                                       "CMPQ_BENCH_T0": str(time.time())})
        print(f"torchrun exited {rc} after {time.perf_counter() - t0:.1f}s", flush=True)
        raise SystemExit(rc)
    t_start = float(os.environ.get("CMPQ_BENCH_T0", time.time()))
    dist = distributed.init("cpu" if a.cpu else None) if distributed.launched() else None
    try:
        device = dist.device if dist else torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
        work = Path(a.workdir)
        path = work / a.shape
        if not (path / "config.json").is_file():
            raise SystemExit(f"{path} is missing; run `quantize_speed.py build --shape {a.shape}` first")
        nproc = dist.world_size if dist else 1
        if a.method == "cmpq":
            out = _q_out(work, a.shape, nproc, a.cap)
            if dist is None or dist.main:
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(Path(str(out) + ".partial"), ignore_errors=True)
            if dist is not None:
                dist.broadcast_object(None)  # nobody starts before rank 0 has cleared the output
            one_cuda = dist is None and device.type == "cuda"
            with profiled_finetune(a.profile_finetune if one_cuda else 0), profiled_block(a.profile_block if one_cuda else 0), \
                    profiled_sensitivity(a.profile_sensitivity if one_cuda else 0):
                r = run(path, out, device, a.nsamples, a.seqlen, a.bits, a.batch, a.cap, False, a.checkpoint, dist,
                        a.algorithm, a.finetune_epochs)
        else:
            r = run_baseline(path, a.method, device, a.nsamples, a.seqlen, a.bits, a.batch)
        if r is not None:
            r = {"kind": "quantize", "shape": a.shape, **r, "bits": a.bits, "nsamples": a.nsamples, "seqlen": a.seqlen,
                 "batch": a.batch, "wall_s": round(time.time() - t_start, 2), **_env_info(device)}
            _append(a.append, r)
    finally:
        distributed.finish()


def mode_eval(a) -> None:
    """``cmpq eval --device-map auto`` of a quantized folder, in a fresh process seeing ``--gpus``."""
    work = Path(a.workdir)
    folder = Path(a.model) if a.model else next(
        (p for p in (_q_out(work, a.shape, n, None) for n in (2, 1)) if (p / "cmpq_manifest.json").is_file()), None)
    if folder is None:
        raise SystemExit(f"no quantized {a.shape} folder in {work}; run a `row` first")
    env = dict(os.environ)
    if a.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = a.gpus
    js = work / f"eval-{a.shape}-{(a.gpus or 'all').replace(',', '')}.json"
    cmd = [sys.executable, "-m", "cmpq.cli", "eval", str(folder), "--datasets", "offline", "--seqlen", str(a.seqlen),
           "--max-windows", str(a.windows), "--device-map", a.device_map, "--json", str(js)]
    if a.max_memory:
        cmd += ["--max-memory", a.max_memory]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"cmpq eval failed ({p.returncode})")
    r = json.loads(js.read_text())
    res = r["results"]["offline"]
    _append(a.append, {"kind": "eval", "shape": a.shape, "model": str(folder), "gpus": a.gpus,
                       "device_map_arg": a.device_map, "max_memory": a.max_memory, "wall_s": round(wall, 2),
                       "load_s": r["load_seconds"], "eval_s": r["eval_seconds"], "windows": res["windows"],
                       "seqlen": a.seqlen, "ppl": res["ppl"], "placement": r["device"],
                       "peak_gpu_gib": r.get("peak_gpu_memory_gib"), "date": datetime.date.today().isoformat()})


def mode_all(a) -> None:
    """The single-process table (as before the multi-GPU modes existed); with --tiny, every mode on the CPU."""
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    work = Path(a.workdir or tempfile.mkdtemp(prefix="cmpq-bench-"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    plan = [(s, None) for s in a.shapes]
    if a.capped:
        s, cap = a.capped.split(":")
        plan.append((s, cap))  # last: the allocator cap stays set for the process
    rows = []
    try:
        for shape, cap in plan:
            path = build(shape, work, dtype)
            out = _q_out(work, shape, 1, cap)
            shutil.rmtree(out, ignore_errors=True)
            r = {"shape": shape, **run(path, out, device, a.nsamples, a.seqlen, a.bits, a.batch, cap, False,
                                       algorithm=a.algorithm, finetune_epochs=a.finetune_epochs)}
            rows.append(r)
            print(json.dumps(r), flush=True)
        if a.tiny:  # the multi-process row (two gloo processes) and a device-map evaluation, all on the CPU
            me = [sys.executable, os.path.abspath(__file__)]
            # the paper's algorithm: its 1- and 2-process results are byte-identical, which the line below checks
            common = ["--shape", "tiny", "--workdir", str(work), "--nsamples", str(a.nsamples), "--seqlen",
                      str(a.seqlen), "--batch", str(a.batch), "--bits", "3", "--algorithm", "paper", "--cpu"]
            jl = work / "rows.jsonl"
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            for extra in (["--nproc", "1"], ["--nproc", "2"]):
                subprocess.run([*me, "row", *common, *extra, "--append", str(jl)], check=True, env=env)
            subprocess.run([*me, "eval", "--shape", "tiny", "--workdir", str(work), "--seqlen", str(a.seqlen),
                            "--windows", "2", "--append", str(jl)], check=True, env=env)
            extra_rows = [json.loads(line) for line in jl.read_text().splitlines()]
            one, two = extra_rows[0], extra_rows[1]
            assert one["processes"] == 1 and two["processes"] == 2, extra_rows
            print(f"tiny: 1 vs 2 processes give {'the same' if one['weights_sha256'] == two['weights_sha256'] else 'DIFFERENT'} "
                  f"weights file; eval ppl {extra_rows[2]['ppl']:.3f}", flush=True)
            rows += extra_rows
        if a.out or not a.tiny:
            out = Path(a.out or "benchmarks/results/quantize-speed.json")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**_env_info(device), "bits": a.bits, "algorithm": a.algorithm,
                                       "nsamples": a.nsamples, "seqlen": a.seqlen,
                                       "batch": a.batch, "runs": rows}, indent=1))
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    argv = sys.argv[1:]
    mode = argv[0] if argv and argv[0] in ("build", "row", "eval") else "all"
    rest = argv[1:] if mode != "all" else argv
    ap = argparse.ArgumentParser(prog=f"quantize_speed.py {mode if mode != 'all' else ''}".strip())
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="where the random models are built (default: a temp folder)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (gloo with several processes)")
    ap.add_argument("--algorithm", choices=("compensated", "paper"), default="compensated",
                    help="CMPQ's algorithm (the default's --bits are effective bits, the paper's nominal)")
    ap.add_argument("--finetune-epochs", type=int, default=None,
                    help="codebook fine-tuning epochs (default: the algorithm's own, 2 for compensated)")
    if mode == "all":
        ap.add_argument("--tiny", action="store_true", help="tiny shape on the CPU, small calibration (smoke test)")
        ap.add_argument("--shapes", nargs="+", default=["7b", "13b"])
        ap.add_argument("--capped", default="13b:8GiB", help="shape:cap run last under --max-gpu-memory ('' to skip)")
        ap.add_argument("--out", default=None, help="JSON table (default benchmarks/results/quantize-speed.json; "
                                                    "none with --tiny)")
    else:
        ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
        ap.add_argument("--append", default=None, help="append the result as one JSON line to this file")
    if mode == "row":
        ap.add_argument("--method", choices=("cmpq", "rtn", "gptq"), default="cmpq")
        ap.add_argument("--nproc", type=int, default=1, help="processes (GPUs); >1 starts torchrun")
        ap.add_argument("--cap", default=None, help="--max-gpu-memory for the run (per GPU), e.g. 8GiB")
        ap.add_argument("--checkpoint", action="store_true", help="write <output>.partial after each block (cmpq)")
        ap.add_argument("--profile-sensitivity", type=int, default=0, metavar="WINDOWS",
                        help="print where WINDOWS windows of the sensitivity pass spend their GPU time (torch.profiler)")
        ap.add_argument("--profile-block", type=int, default=0, metavar="BLOCK",
                        help="print where the walk's block BLOCK (1-based) spends its GPU time (torch.profiler; one CUDA process)")
        ap.add_argument("--profile-finetune", type=int, default=0, metavar="STEPS",
                        help="print where STEPS fine-tuning steps spend their GPU time (torch.profiler; one CUDA process)")
    if mode == "eval":
        ap.add_argument("--model", default=None, help="quantized folder (default: <workdir>/<shape>-q-p2, else -p1)")
        ap.add_argument("--gpus", default=None, help="CUDA_VISIBLE_DEVICES for the evaluation, e.g. 0,1")
        ap.add_argument("--windows", type=int, default=8, help="evaluation windows (offline corpus)")
        ap.add_argument("--device-map", default="auto")
        ap.add_argument("--max-memory", default=None)
    a = ap.parse_args(rest)
    if mode in ("row", "eval") and a.workdir is None:
        ap.error("--workdir is required")
    if mode == "build":
        if a.workdir is None:
            ap.error("--workdir is required")
        mode_build(a)
    elif mode == "row":
        mode_row(a, argv)
    elif mode == "eval":
        mode_eval(a)
    else:
        if a.tiny:
            a.shapes, a.capped = ["tiny"], "tiny:1GiB"
            a.nsamples, a.seqlen, a.batch, a.bits = TINY["nsamples"], TINY["seqlen"], TINY["batch"], TINY["bits"]
        mode_all(a)


if __name__ == "__main__":
    main()
