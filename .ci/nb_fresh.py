"""Are a notebook's committed outputs those of its current code?

`.ci/execute_nb.py` executes a notebook and then records, in its metadata (`metadata.vlm_rlaif`), a hash of the code it
ran and a hash of the outputs it produced. `check` recomputes both: a code cell edited after the execution changes the
source hash (the outputs are stale), outputs edited or cleared by hand change the output hash. Markdown is not hashed
(prose can change without re-running), nor are the cells the execution skips (`#| slow`, `#| eval: false`), which leave
no output.

    python .ci/nb_fresh.py check [NB ...]    # exit 1 and name each stale notebook (default: nbs/*.ipynb)
    python .ci/nb_fresh.py record NB ...     # record the hashes of NB as it is (after a metadata-only change)
"""
from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path

KEY = "vlm_rlaif"  # the notebook-metadata key (settings.ini `allowed_metadata_keys` keeps it through nbdev_clean)
SKIP_FLAGS = ("slow", "eval: false", "eval:false")
ROOT = Path(__file__).resolve().parent.parent


def _src(cell) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def skipped(cell) -> bool:
    "A code cell that execution skips, as nbdev_test does: a `#| slow` or `#| eval: false` directive."
    if cell.get("cell_type") != "code": return True
    for line in _src(cell).splitlines():
        l = line.strip()
        if not l.startswith("#|"): break
        if l[2:].strip() in SKIP_FLAGS: return True
    return False


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def source_hash(nb: dict) -> str:
    "Hash of the executed code cells' sources (trailing whitespace ignored)."
    return _sha([[l.rstrip() for l in _src(c).rstrip().splitlines()] for c in nb["cells"] if not skipped(c)])


def _clean(nb: dict) -> dict:
    "A copy of `nb` as nbdev_clean leaves it (execution counts, `at 0x...` ids), so cleaning does not change the hash."
    nb = copy.deepcopy(nb)
    try:
        from nbdev.clean import clean_nb
        clean_nb(nb, allowed_metadata_keys=[KEY])
    except ImportError: pass
    return nb


def _text(x) -> str:
    return "".join(x) if isinstance(x, list) else (x if isinstance(x, str) else json.dumps(x, sort_keys=True))


def outputs_hash(nb: dict) -> str:
    "Hash of the executed code cells' outputs (types, texts, data), in cell order."
    outs = []
    for c in _clean(nb)["cells"]:
        if skipped(c): continue
        outs.append([dict(t=o.get("output_type"), name=o.get("name"), text=_text(o.get("text", "")),
                          data={k: _text(v).rstrip() for k, v in (o.get("data") or {}).items()},
                          ename=o.get("ename")) for o in c.get("outputs", [])])
    return _sha(outs)


def hashes(nb: dict) -> dict:
    return dict(source_hash=source_hash(nb), outputs_hash=outputs_hash(nb))


def record(path, **extra) -> dict:
    "Write the current hashes of notebook `path` (plus `extra`) into its metadata; returns them."
    path = Path(path)
    nb = json.loads(path.read_text(encoding="utf-8"))
    meta = dict(hashes(nb), **extra)
    nb.setdefault("metadata", {})[KEY] = meta
    path.write_text(json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")  # as nbdev writes
    return meta


def problems(path) -> list[str]:
    "Why the committed outputs of notebook `path` are not known to be fresh (empty list: fresh)."
    path = Path(path)
    try: nb = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e: return [f"{path}: cannot read the notebook ({e})"]
    rec = nb.get("metadata", {}).get(KEY)
    if not rec or "source_hash" not in rec:
        return [f"{path.name}: no execution record (metadata.{KEY}); run `make nbs NB={path.name}`"]
    now, out = hashes(nb), []
    if rec["source_hash"] != now["source_hash"]:
        out.append(f"{path.name}: code cells changed since the outputs were made (source hash {rec['source_hash']} "
                   f"recorded, {now['source_hash']} now); re-execute: `make nbs NB={path.name}`")
    if rec.get("outputs_hash") != now["outputs_hash"]:
        out.append(f"{path.name}: outputs differ from those the recorded execution produced (edited or cleared by "
                   f"hand?); re-execute: `make nbs NB={path.name}`")
    return out


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("check", "record") else "check"
    paths = [Path(a) for a in argv] or sorted((ROOT / "nbs").glob("*.ipynb"))
    if cmd == "record":
        if not argv: print("record: name the notebooks"); return 2
        for p in paths: print(p.name, record(p))
        return 0
    bad = [m for p in paths for m in problems(p)]
    for m in bad: print("STALE:", m)
    print(f"{len(paths) - len({m.split(':')[0] for m in bad})}/{len(paths)} notebooks fresh")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
