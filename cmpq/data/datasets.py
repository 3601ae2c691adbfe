"""Text sources for calibration and evaluation, resolved without surprises.

Order: an explicit path; the folder named by ``CMPQ_DATA_DIR`` (layout of shared/data/SOURCES.md);
the Hugging Face hub through ``datasets`` (skipped when ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
is set). If none works the error says what was tried and how to fix it. The ``offline`` corpus
(Python's own ``pydoc_data.topics``) is used only when asked for by name, and is labelled as such
everywhere: it is never passed off as WikiText or C4.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DATA_ENV = "CMPQ_DATA_DIR"
WIKITEXT_TEST = "wikitext-2-raw/wiki.test.raw"
WIKITEXT_TRAIN = "wikitext-2-raw/wiki.train.raw"
C4_VAL = "c4/c4-validation.00000-of-00008.head.jsonl"
C4_TRAIN = "c4/c4-train.00000-of-01024.head.jsonl"
C4_NEW_DOCS = 1100  # GPTQ's "c4-new": the first 1,100 validation documents
EVAL_DATASETS = ("wikitext2", "c4", "c4-random", "offline")
CALIB_DATASETS = ("c4", "wikitext2", "offline")


class DataUnavailable(RuntimeError):
    """No source for a data set could be found."""


@dataclass
class TextSource:
    """Text (or documents) plus an honest description of where it came from."""

    name: str
    source: str
    text: str | None = None
    documents: list[str] | None = None

    def joined(self, sep: str) -> str:
        return self.text if self.text is not None else sep.join(self.documents or [])


def _data_dir() -> Path | None:
    d = os.environ.get(DATA_ENV)
    return Path(d).expanduser() if d else None


def _hub_allowed() -> bool:
    return not any(os.environ.get(v, "0") not in ("0", "") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is refused naming it, the line and the byte
    (Python's own error names neither the file nor the line)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: not UTF-8 text (line {line}, byte {e.start}: {e.reason}); re-encode it as "
                         f"UTF-8 or use an intact copy") from None


def read_wikitext_file(path: Path) -> list[str]:
    """Rows of a WikiText raw file; lines are rows (CRLF or LF), the final empty string dropped."""
    raw = read_utf8(path)
    rows = raw.replace("\r\n", "\n").split("\n")
    if rows and rows[-1] == "":
        rows.pop()
    return rows


def read_jsonl(path: Path, field: str = "text") -> list[str]:
    docs = []
    # "\n" only: str.splitlines would also cut at U+2028 and others, which JSON strings may hold raw
    for n, line in enumerate(read_utf8(path).split("\n"), 1):
        if line.strip():
            try:
                docs.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON object with a {field!r} field ({e})") from None
    return docs


def describe_path(p: Path) -> str:
    """How a data file is named in descriptions, which end up in saved models and reports: relative
    to ``CMPQ_DATA_DIR`` when inside it, else the file name. Never an absolute path, which would
    say where the quantizing machine kept its files and nothing about the data."""
    d = _data_dir()
    if d is not None:
        try:
            return f"${DATA_ENV}/{p.resolve().relative_to(d.resolve()).as_posix()}"
        except ValueError:
            pass
    return p.name


def read_text_file(path: str | Path) -> TextSource:
    """A local file: ``.jsonl`` (one ``{"text": ...}`` per line) or plain text."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    where = describe_path(p)
    if p.suffix in (".jsonl", ".json"):
        return TextSource(p.name, where, documents=read_jsonl(p))
    if p.name.startswith("wiki.") and p.suffix == ".raw":
        return TextSource(p.name, where, documents=read_wikitext_file(p))
    return TextSource(p.name, where, text=read_utf8(p))


def offline_corpus(part: str) -> TextSource:
    """Python's bundled help topics, split by topic: every 4th topic is held out for evaluation."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    chosen = [k for i, k in enumerate(keys) if (i % 4 == 3) == (part == "eval")]
    label = f"offline corpus (pydoc_data.topics, {part} part, {len(chosen)} topics; NOT WikiText/C4)"
    return TextSource("offline", label, documents=[topics[k] for k in chosen])


def _hub(name: str, split: str) -> TextSource:
    if not _hub_allowed():
        raise DataUnavailable("hub access disabled by HF_HUB_OFFLINE/HF_DATASETS_OFFLINE")
    from cmpq.extras import available

    if not available("datasets"):
        raise DataUnavailable("hub: needs the datasets package: pip install 'cmpq[datasets]'")
    import datasets

    try:
        if name == "wikitext2":
            ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return TextSource(name, f"hub:wikitext-2-raw-v1/{split}", documents=list(ds["text"]))
        shard = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        ds = datasets.load_dataset("allenai/c4", data_files={split: shard}, split=split)
        return TextSource(name, f"hub:allenai/c4/{shard}", documents=list(ds["text"]))
    except Exception as e:  # network errors come in many types
        raise DataUnavailable(f"hub: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def load_text(name: str, split: str, path: str | Path | None = None) -> TextSource:
    """Resolve data set ``name`` (wikitext2 | c4 | offline) for ``split`` (train | test/validation)."""
    if path is not None:
        return read_text_file(path)
    if name == "offline":
        return offline_corpus("calib" if split == "train" else "eval")
    if name not in ("wikitext2", "c4"):
        raise ValueError(f"unknown data set {name!r}; choose from wikitext2, c4, offline, or give a file path")
    tried = []
    d = _data_dir()
    if d is not None:
        rel = {("wikitext2", "test"): WIKITEXT_TEST, ("wikitext2", "train"): WIKITEXT_TRAIN,
               ("c4", "validation"): C4_VAL, ("c4", "train"): C4_TRAIN}[(name, split)]
        f = d / rel
        if f.is_file():
            src = read_text_file(f)
            src.name = name
            return src
        tried.append(f"{DATA_ENV}: no {f}")
    else:
        tried.append(f"{DATA_ENV} is not set")
    try:
        return _hub(name, "validation" if split == "validation" else split)
    except DataUnavailable as e:
        tried.append(str(e))
    raise DataUnavailable(
        f"cannot find {name} ({split}). Tried: " + "; ".join(tried) + ". Fix: set "
        f"{DATA_ENV} to a folder holding {WIKITEXT_TEST} / {C4_VAL} / {C4_TRAIN}, pass a file path, "
        "allow the Hugging Face hub, or use the clearly labelled 'offline' corpus."
    )
