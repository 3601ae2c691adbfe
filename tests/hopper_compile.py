"""Compile a Triton kernel for sm_90 in a subprocess, with no GPU present (Triton's bundled ptxas).

Triton's interpreter checks a kernel's arithmetic, not that it lowers; a kernel that would fail to
compile on the device fails here instead. The subprocess runs without ``TRITON_INTERPRET`` (the test
session sets it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json, re, sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
spec = json.loads(sys.argv[1])
scope = {}
exec(spec["build"], scope)
src = ASTSource(scope["fn"], spec["sig"], constexprs=spec["constexprs"])
cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": spec["num_warps"]})
print(json.dumps([len(re.findall(r"(ld|st)[.]local", cc.asm["ptx"])), len(cc.asm["cubin"])]))
"""


def compile_for_hopper(build: str, sig: dict, constexprs: dict, num_warps: int) -> tuple[int, int]:
    """(local-memory loads and stores in the PTX, i.e. spills; cubin bytes) of the kernel that the
    Python statement ``build`` binds to ``fn``. Skips where Triton's ptxas is missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    spec = json.dumps({"build": build, "sig": sig, "constexprs": constexprs, "num_warps": num_warps})
    r = subprocess.run([sys.executable, "-c", _SCRIPT, spec], capture_output=True, text=True, env=env, timeout=300)
    if r.returncode != 0 and ("ptxas" in r.stderr and "not found" in r.stderr.lower()):
        pytest.skip("Triton's ptxas is not available: cannot compile for the GPU here")
    assert r.returncode == 0, r.stderr[-2000:]
    spills, cubin = json.loads(r.stdout.strip().splitlines()[-1])
    return spills, cubin
