"""SASS instructions per weight of the rlut kernel's inner loops (sm_90a cubin, no GPU needed).

Builds ``cmpq/kernels/kernel_rlut.cu`` with ``nvcc -cubin`` and disassembles it with ``nvdisasm``
(from the CUDA toolkit, or the copy Triton ships). Two views per width:
- probe: ``rlut_probe<K, NTL, Q>`` (``-DCMPQ_RLUT_PROBE``), one kind's unit body in a loop: the
  lookup + MMA work per weight, the number issue 11 budgets (~3).
- kernel: the real kernel built with ``-DCMPQ_RLUT_ONLY_KIND=K``: the whole per-unit loop (ring wait,
  offset arithmetic, cp.async refill; straight-line code, so the static count is what a unit runs,
  but for the branches around the refill).
Also prints registers and spills of the production kernels (``ptxas -v``).
Usage: python benchmarks/rlut_sass.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "cmpq", "kernels", "kernel_rlut.cu")
KINDS = {0: "2-bit", 1: "3-bit", 2: "4-bit", 3: "fp16 cols"}
KU = {0: 4, 1: 4, 2: 4, 3: 1}
INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
NEVER = "@!PT"  # predicated off: padding the compiler puts around LDGSTS, never issued
LABEL = re.compile(r"^\.(L_x_\d+):")


def tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for pat in ("/usr/local/cuda*/bin/" + name, os.path.expanduser("~") + "/**/triton/backends/nvidia/bin/" + name,
                "/work/*/.venv/lib/python3*/site-packages/triton/backends/nvidia/bin/" + name):
        hits = glob.glob(pat, recursive=True)
        if hits:
            return hits[0]
    try:
        import triton

        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        if os.path.exists(p):
            return p
    except ImportError:
        pass
    raise SystemExit(f"{name} not found")


def build(defines: list[str], tmp: str, tag: str) -> tuple[str, str]:
    cubin = os.path.join(tmp, tag + ".cubin")
    r = subprocess.run([tool("nvcc"), "-O3", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", *defines, "-o", cubin, SRC],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True, check=True).stdout
    return sass, r.stderr


def functions(sass: str) -> dict[str, list]:
    """name -> [(addr, opcode, operands) or ('label', name)]"""
    res, cur = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.text\.(\S+):", line)
        if m:
            cur = res.setdefault(m.group(1), [])
            continue
        if cur is None:
            continue
        lm = LABEL.match(line.strip())
        if lm:
            cur.append(("label", lm.group(1)))
            continue
        im = INSN.search(line)
        if im and (im.group(2) or "").strip() != NEVER:
            cur.append((int(im.group(1), 16), im.group(3), im.group(4)))
    return res


def main_loop(body: list) -> collections.Counter:
    """Opcodes of the outermost loop holding an HMMA (a backward BRA's range)."""
    labels, insns = {}, []
    for item in body:
        if item[0] == "label":
            labels[item[1]] = None
        else:
            for name in [n for n, v in labels.items() if v is None]:
                labels[name] = item[0]
            insns.append(item)
    best = None
    for addr, op, args in insns:
        if op.startswith("BRA"):
            m = re.search(r"\.(L_x_\d+)", args)
            if m and labels.get(m.group(1)) is not None and labels[m.group(1)] < addr:
                lo = labels[m.group(1)]
                rng = [(a, o) for a, o, _ in insns if lo <= a <= addr]
                if any(o.startswith("HMMA") for _, o in rng) and (best is None or len(rng) > len(best)):
                    best = rng
    return collections.Counter(o.split(".")[0] for _, o in best or [] if o != "NOP")


def fmt(c: collections.Counter, w: int) -> dict:
    top = ", ".join(f"{k} {v / w:.2f}" for k, v in c.most_common(7))
    return dict(total=sum(c.values()), weights=w, per_weight=round(sum(c.values()) / w, 3), top=top,
                counts=dict(c))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sass, log = build([], tmp, "prod")
        out["kernels"], name = [], None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '(\S+)'", line)
            name = m.group(1) if m else name
            m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m:
                st = [int(v) for v in m.groups()]
            m = re.search(r"Used (\d+) registers", line)
            if m and name:
                out["kernels"].append(dict(name=name, stack=st[0], spill_st=st[1], spill_ld=st[2], regs=int(m.group(1))))
        print("production kernels (ptxas -v, sm_90a):")
        for k in out["kernels"]:
            print(f"  {k['name']}: {k['regs']} registers, stack {k['stack']}, spill {k['spill_st']}/{k['spill_ld']}")
        psass, _ = build(["-DCMPQ_RLUT_PROBE"], tmp, "probe")
        fns = functions(psass)
        out["probe"], out["kernel"] = {}, {}
        print("\nSASS instructions per weight (per lane: KU k-steps x Q tile groups x 4 tiles x 8 weights)")
        print(f"{'width':10} {'NTL':>3} {'probe':>6} {'kernel':>7}   probe breakdown per weight")
        for K in range(4):
            ksass, _ = build([f"-DCMPQ_RLUT_ONLY_KIND={K}"], tmp, f"only{K}")
            kfns = functions(ksass)
            for ntl, q in ((1, 2), (2, 1), (4, 1)):
                w = KU[K] * q * 4 * 8
                pname = next(n for n in fns if n.startswith(f"_Z10rlut_probeILi{K}ELi{ntl}ELi{q}E"))
                kname = next(n for n in kfns if n.startswith(f"_Z11rlut_kernelILi{ntl}ELi{q}ELi0E"))
                p, k = fmt(main_loop(fns[pname]), w), fmt(main_loop(kfns[kname]), w)
                out["probe"][f"{K}/{ntl}"], out["kernel"][f"{K}/{ntl}"] = p, k
                print(f"{KINDS[K]:10} {ntl:>3} {p['per_weight']:>6.2f} {k['per_weight']:>7.2f}   {p['top']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
