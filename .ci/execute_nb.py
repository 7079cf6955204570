"""Execute notebooks top to bottom in a fresh shell each and save their outputs (what `make nbs` runs).

    python .ci/execute_nb.py nbs/05_sft.ipynb [more.ipynb ...]

As nbdev_test does, `#| slow` and `#| eval: false` cells are skipped (they stay without output); the working directory
is the notebook's folder, as in Jupyter. Afterwards: machine paths are taken out of the outputs (warnings' file
locations are dropped; the repository root, the Python prefix and the temp directory become `<repo>`, `<python>`,
`<tmp>`), the notebook is cleaned as nbdev_clean does, and the hashes of its code and outputs are recorded in its
metadata (`.ci/nb_fresh.py`; tests/test_nb_fresh.py checks them). A notebook whose execution fails is not written.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import nb_fresh  # noqa: E402

ROOT = nb_fresh.ROOT
_TMP = re.escape(os.path.realpath(tempfile.gettempdir()).rstrip("/"))
_SUBS = [(re.compile(re.escape(str(ROOT))), "<repo>"),
         (re.compile(re.escape(sys.prefix.rstrip("/"))), "<python>"),
         (re.compile(rf"(?:/private)?{_TMP}(?=/)"), "<tmp>")]
_SYS = re.compile(r"site-packages|dist-packages|/usr/lib/python")


def _sub(s: str) -> str:
    for rx, new in _SUBS: s = rx.sub(new, s)
    return s


def strip_paths(nb) -> int:
    "Remove machine paths from `nb`'s outputs in place; returns the number of lines dropped."
    n = 0
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            if o.get("output_type") == "stream":
                text = "".join(o["text"]) if isinstance(o["text"], list) else o["text"]
                new, skip_next = [], False
                for l in text.splitlines(keepends=True):
                    if skip_next: skip_next = False; n += 1; continue
                    if _SYS.search(l):  # a warning's location in an installed package, then its source line
                        n += 1; skip_next = "Warning" in l; continue
                    new.append(_sub(l))
                o["text"] = "".join(new)
            for k, v in (o.get("data") or {}).items():
                if k.startswith("text"): o["data"][k] = _sub("".join(v) if isinstance(v, list) else v)
        c["outputs"] = [o for o in c.get("outputs", []) if o.get("output_type") != "stream" or o["text"]]
    return n


def _lines(s):
    return s.splitlines(keepends=True) if isinstance(s, str) else s


def normalise(nb) -> None:
    "As Jupyter saves a notebook: no outputs on markdown cells, multi-line texts as lists of lines."
    for c in nb["cells"]:
        if c["cell_type"] != "code":
            c.pop("outputs", None); c.pop("execution_count", None); continue
        for o in c.get("outputs", []):
            if "text" in o: o["text"] = _lines(o["text"])
            for k, v in (o.get("data") or {}).items():
                if k.startswith("text") or k == "image/svg+xml": o["data"][k] = _lines(v)


def execute(path) -> float:
    from execnb.nbio import nb2dict, read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.clean import clean_nb
    from nbdev.config import get_config
    path = Path(path).resolve()
    t0, cwd = time.time(), os.getcwd()
    nb = read_nb(path)
    os.chdir(path.parent)
    try:
        CaptureShell(path=path.parent).run_all(nb, exc_stop=True, preproc=nb_fresh.skipped)
    except Exception:
        bad = [i for i, c in enumerate(nb.cells) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
        if bad: print(f"{path.name}: cell {bad[0]} failed (not written):\n{nb.cells[bad[0]].source[:300]}", file=sys.stderr)
        raise
    finally:
        os.chdir(cwd)
    nb = nb2dict(nb)
    strip_paths(nb)
    normalise(nb)
    cfg = get_config(path=ROOT)  # as nbdev_clean does with settings.ini (which keeps metadata.vlm_rlaif)
    clean_nb(nb, False, cfg.get("allowed_metadata_keys", "").split(), cfg.get("allowed_cell_metadata_keys", "").split(),
             str(cfg.get("clean_ids", "True")).lower() != "false")
    write_nb(nb, path)
    secs = time.time() - t0
    nb_fresh.record(path, seconds=round(secs))
    return secs


if __name__ == "__main__":
    if len(sys.argv) < 2: sys.exit(__doc__)
    for p in sys.argv[1:]:
        print(Path(p).name, f"{execute(p):.0f} s", flush=True)
