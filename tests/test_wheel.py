"""The package a user installs: build the wheel, install it on its own, and run it from there.

Marked slow (about half a minute: a wheel build and three fresh interpreters), so ``make test``
runs it and ``-m "not slow"`` skips it. The wheel goes into a ``--target`` folder with
``--no-deps`` (the current environment supplies torch and transformers), and the checks run from a
folder outside the repository with that folder first on ``PYTHONPATH``, so nothing can come from
the source tree.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted(p.name for p in (REPO / "cmpq" / "kernels").glob("*.cu"))

SCRIPT = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import cmpq

    site, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    assert Path(cmpq.__file__).resolve().is_relative_to(site), cmpq.__file__
    kernels = Path(cmpq.__file__).parent / "kernels"
    print("cu:", " ".join(sorted(p.name for p in kernels.glob("*.cu"))))

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    vocab = {chr(i): i for i in range(32, 127)} | {"[UNK]": 0}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    LlamaForCausalLM(cfg).save_pretrained(out / "base")
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(out / "base")

    model, tok = cmpq.load_model(str(out / "base"))
    calib = torch.randint(32, 127, (4, 32), generator=torch.Generator().manual_seed(1))
    cmpq.quantize(model, tok, cmpq.CMPQConfig(bits=3, algorithm="paper"), calib=calib,
                  device="cpu", log=None)
    cmpq.save(model, out / "q")
    print("saved")
''')


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_wheel_installs_and_runs_on_its_own(tmp_path):
    src = tmp_path / "src"  # build from a copy: the build leaves build/ and *.egg-info next to the sources
    shutil.copytree(REPO / "cmpq", src / "cmpq", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1",
                                                                         "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
          "-w", str(tmp_path / "dist")], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("cmpq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert KERNEL_SOURCES and all(f"cmpq/kernels/{n}" in names for n in KERNEL_SOURCES)

    site = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], tmp_path, env)
    env["PYTHONPATH"] = str(site)
    work = tmp_path / "work"
    work.mkdir()
    out = _run([sys.executable, "-c", SCRIPT, str(site), str(work)], work, env)
    assert f"cu: {' '.join(KERNEL_SOURCES)}" in out and "saved" in out
    gen = _run([sys.executable, "-m", "cmpq.cli", "generate", str(work / "q"), "hi", "--max-new-tokens", "4",
                "--device", "cpu"], work, env)
    assert "new tokens, prompt 2" in gen, gen
    assert "cmpq 0.1.0" in _run([sys.executable, str(site / "bin" / "cmpq"), "--version"], work, env)
