"""Build a static HTML site of the executed notebooks: `make docs` -> _docs/ (or `python .ci/make_docs.py OUTDIR`).

No execution: each notebook in nbs/ is converted as committed, with its outputs (figures embedded as data URIs).
nbdev directives are hidden: cells marked `#| export`, `#| exporti`, `#| hide` or `#| default_exp` are dropped,
and `#| ...` lines are stripped from the cells that are shown. The mermaid diagram of nbs/index.ipynb is drawn as
a small inline SVG generated here (no mermaid.js, no CDN). One API page per module of vlm_rlaif lists the public
names in its `__all__` with their signatures and docstrings (via inspect). Nothing in the site loads anything from
the network.
"""
import html, importlib, inspect, re, sys
from pathlib import Path

import nbformat
from nbconvert import HTMLExporter
from nbconvert.filters import markdown2html_mistune
from nbconvert.preprocessors import Preprocessor
from pygments.formatters import HtmlFormatter

ROOT = Path(__file__).resolve().parent.parent
NBS, PKG = ROOT / "nbs", "vlm_rlaif"
HIDE = {"export", "exporti", "hide", "default_exp"}  # cells carrying one of these directives are not shown
DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)")


class NbdevDirectives(Preprocessor):
    "Drop hidden cells and strip `#| ...` directive lines from the others."

    def preprocess(self, nb, resources):
        cells = []
        for c in nb.cells:
            if c.cell_type == "code":
                lines = c.source.splitlines()
                names = {m.group(1) for m in map(DIRECTIVE.match, lines) if m}
                if names & HIDE: continue
                c.source = "\n".join(l for l in lines if not DIRECTIVE.match(l)).strip("\n")
                if not c.source.strip() and not c.get("outputs"): continue
            cells.append(c)
        nb.cells = cells
        return nb, resources


def title_of(nb, default):
    for c in nb.cells:
        if c.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", c.source, re.M)
            if m: return m.group(1).strip()
    return default


def default_exp(nb):
    for c in nb.cells:
        m = re.search(r"^\s*#\|\s*default_exp\s+(\S+)", c.source, re.M)
        if m and c.cell_type == "code": return m.group(1)


# ---- the mermaid flowchart as an SVG, drawn here --------------------------------------------------------------------
NODE = re.compile(r'\s*(\w+)\s*(?:\[([^\]]*)\]|\{([^}]*)\})?')
EDGE = re.compile(r'\s*(?:--\s*"([^"]*)"\s*-->|-->)')


def parse_flowchart(src):
    "Nodes {id: (label, shape)} and edges [(a, b, label)] of a small `flowchart LR` (chains, `-- \"text\" -->`)."
    nodes, edges = {}, []
    for line in src.splitlines()[1:]:
        line, pos, prev, lab = line.rstrip(), 0, None, None
        while pos < len(line):
            m = NODE.match(line, pos)
            if not m or not m.group(1): break
            nid, sq, cu = m.groups()
            if nid not in nodes or sq or cu: nodes[nid] = (sq or cu or nodes.get(nid, (nid,))[0], "diamond" if cu else "box")
            if prev is not None: edges.append((prev, nid, lab))
            prev, pos = nid, m.end()
            e = EDGE.match(line, pos)
            if not e: break
            lab, pos = e.group(1), e.end()
    return nodes, edges


def flowchart_svg(src):
    nodes, edges = parse_flowchart(src)
    rank = {n: 0 for n in nodes}
    for _ in nodes:  # longest path from the sources
        for a, b, _l in edges: rank[b] = max(rank[b], rank[a] + 1)
    lines = {n: html.unescape(l).replace("<br/>", "\n").replace("<br>", "\n").split("\n") for n, (l, _s) in nodes.items()}
    cw, lh, colw, gap = 6.6, 15, {}, 46
    for n in nodes: colw[rank[n]] = max(colw.get(rank[n], 0), max(len(s) for s in lines[n]) * cw + 20)
    xs, x = {}, 10
    for r in sorted(colw): xs[r], x = x, x + colw[r] + gap
    mid, box = 70, {}
    for n, (_l, shape) in nodes.items():
        w, h = colw[rank[n]], len(lines[n]) * lh + 14 + (14 if shape == "diamond" else 0)
        box[n] = (xs[rank[n]], mid - h / 2, w, h)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {x:.0f} 160" width="100%" style="min-width:{x * .8:.0f}px" font-family="sans-serif" '
           'font-size="11" role="img" aria-label="pipeline diagram"><defs><marker id="arr" viewBox="0 0 10 10" refX="10" '
           'refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M0,0L10,5L0,10z" fill="#555"/></marker></defs>']
    for a, b, lab in edges:
        (ax, ay, aw, ah), (bx, by, bw, bh) = box[a], box[b]
        if rank[b] - rank[a] == 1:
            x1, y1, x2, y2 = ax + aw, mid, bx, mid
            out.append(f'<line x1="{x1:.0f}" y1="{y1}" x2="{x2:.0f}" y2="{y2}" stroke="#555" marker-end="url(#arr)"/>')
            tx, ty = (x1 + x2) / 2, mid - 40
        else:  # a long edge goes under the boxes between
            x1, x2, yb = ax + aw / 2, bx + bw / 2, mid + 75
            out.append(f'<path d="M{x1:.0f},{ay + ah:.0f} C{x1:.0f},{yb} {x2:.0f},{yb} {x2:.0f},{by + bh:.0f}" fill="none" '
                       'stroke="#555" marker-end="url(#arr)"/>')
            tx, ty = (x1 + x2) / 2, yb + 12
        if lab:
            for i, s in enumerate(html.unescape(lab).replace("<br/>", "\n").split("\n")):
                out.append(f'<text x="{tx:.0f}" y="{ty + i * 12:.0f}" text-anchor="middle" fill="#333" font-style="italic" '
                           f'font-size="9">{html.escape(s)}</text>')
    for n, (_l, shape) in nodes.items():
        bx, by, bw, bh = box[n]
        if shape == "diamond":
            cx, cy = bx + bw / 2, by + bh / 2
            out.append(f'<polygon points="{bx:.0f},{cy:.0f} {cx:.0f},{by - 8:.0f} {bx + bw:.0f},{cy:.0f} {cx:.0f},'
                       f'{by + bh + 8:.0f}" fill="#fdf2d0" stroke="#a68a2d"/>')
        else:
            out.append(f'<rect x="{bx:.0f}" y="{by:.0f}" width="{bw:.0f}" height="{bh:.0f}" rx="5" fill="#e8eefc" stroke="#4a63a8"/>')
        y0 = by + bh / 2 - (len(lines[n]) - 1) * lh / 2 + 4
        for i, s in enumerate(lines[n]):
            out.append(f'<text x="{bx + bw / 2:.0f}" y="{y0 + i * lh:.0f}" text-anchor="middle">{html.escape(s)}</text>')
    return "\n".join(out + ["</svg>"])


MERMAID = re.compile(r'<div class="jp-Mermaid">\s*<pre class="mermaid">\s*(.*?)</pre>\s*</div>', re.S)


def render_mermaid(body):
    def sub(m):
        src = html.unescape(m.group(1)).strip()
        try: svg = flowchart_svg(src) if src.startswith(("flowchart", "graph")) else ""
        except Exception as e: svg = f"<p><em>(diagram not drawn: {html.escape(repr(e))})</em></p>"
        return (f'<figure class="diagram">{svg}<details><summary>diagram source (mermaid)</summary>'
                f'<pre>{html.escape(src)}</pre></details></figure>')
    return MERMAID.sub(sub, body)


# ---- pages ----------------------------------------------------------------------------------------------------------
CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:0 auto;padding:1em 2em;line-height:1.5;color:#222}
nav{border-bottom:1px solid #ddd;padding:.4em 0;margin-bottom:1em;font-size:.95em}nav a{margin-right:1em}
pre{background:#f6f8fa;padding:.6em;overflow-x:auto;font-size:.85em}code{font-size:.9em}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .5em;vertical-align:top}
img{max-width:100%}.jp-InputArea,.input_area{margin-top:.6em}.jp-OutputArea pre,.output_area pre{background:#fff;border-left:3px solid #ddd}
.jp-InputPrompt,.jp-OutputPrompt,.prompt{display:none}figure.diagram{margin:1em 0;overflow-x:auto}
a.anchor-link{visibility:hidden;text-decoration:none;margin-left:.3em}:hover>a.anchor-link{visibility:visible}
dl.api dt{font-family:monospace;font-weight:bold;margin-top:1.2em;background:#f0f3f8;padding:.3em}dl.api dd{margin-left:1.2em}
"""


def page(title, body, depth=0):
    up = "../" * depth
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>\n'
            f'<style>{CSS}\n{HtmlFormatter().get_style_defs(".highlight")}</style></head>\n<body>\n'
            f'<nav><a href="{up}index.html">vlm-rlaif</a> <a href="{up}index.html#notebooks">notebooks</a> '
            f'<a href="{up}index.html#api">API</a></nav>\n<main>\n{body}\n</main></body></html>\n')


def convert(path, exporter):
    nb = nbformat.read(path, as_version=4)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"path": str(path.parent)}})
    return render_mermaid(body)


def md(s): return markdown2html_mistune(s)


def api_page(mod_name, nb_name):
    mod = importlib.import_module(f"{PKG}.{mod_name}")
    items = []
    for name in getattr(mod, "__all__", []):
        obj = getattr(mod, name, None)
        if obj is None: continue
        kind = "class" if inspect.isclass(obj) else "def" if callable(obj) else ""
        try: sig = str(inspect.signature(obj)) if callable(obj) else ""
        except (TypeError, ValueError): sig = "(...)"
        if not kind: sig = " = " + (repr(obj) if len(repr(obj)) < 120 else repr(obj)[:117] + "...")
        doc = inspect.getdoc(obj) if (callable(obj) and obj.__doc__) else ""
        sub = ""
        if inspect.isclass(obj):  # public methods defined on the class itself, with a docstring
            for mn, m in vars(obj).items():
                if mn.startswith("_") or not inspect.isfunction(m) or not m.__doc__: continue
                try: ms = str(inspect.signature(m))
                except (TypeError, ValueError): ms = "(...)"
                sub += (f'<dt id="{name}.{mn}">{name}.{html.escape(mn + ms)}</dt>'
                        f'<dd>{md(inspect.getdoc(m) or "")}</dd>')
        items.append(f'<dt id="{name}">{kind} {html.escape(name + sig)}</dt><dd>{md(doc) if doc else ""}'
                     f'{f"<dl class=api>{sub}</dl>" if sub else ""}</dd>')
    head = f"<h1>API: <code>{PKG}.{mod_name}</code></h1>\n"
    if mod.__doc__: head += md(inspect.getdoc(mod))
    if nb_name: head += f'<p>Source notebook: <a href="../{nb_name}.html">{nb_name}</a></p>\n'
    return page(f"{PKG}.{mod_name}", head + '<dl class="api">\n' + "\n".join(items) + "\n</dl>", depth=1)


def build(out=ROOT / "_docs"):
    out = Path(out); (out / "api").mkdir(parents=True, exist_ok=True)
    ex = HTMLExporter(template_name="basic", embed_images=True, exclude_input_prompt=True, exclude_output_prompt=True)
    ex.register_preprocessor(NbdevDirectives(), enabled=True)
    nbs, mods = [], {}
    for p in sorted(NBS.glob("*.ipynb")):
        if p.stem == "index": continue
        nb = nbformat.read(p, as_version=4)
        mod = default_exp(nb)
        nbs.append((p.stem, title_of(nb, p.stem), mod))
        if mod: mods[mod] = p.stem
        api = f'<p>API: <a href="api/{mod}.html"><code>{PKG}.{mod}</code></a></p>\n' if mod else ""
        (out / f"{p.stem}.html").write_text(page(title_of(nb, p.stem), api + convert(p, ex)), encoding="utf-8")
    sys.path.insert(0, str(ROOT))
    modules = sorted(p.stem for p in (ROOT / PKG).glob("*.py") if not p.stem.startswith("_"))
    for m in modules: (out / "api" / f"{m}.html").write_text(api_page(m, mods.get(m)), encoding="utf-8")
    toc = '<h2 id="notebooks">Notebooks</h2>\n<ol>\n' + "".join(
        f'<li><a href="{s}.html">{html.escape(t)}</a> <small>({s}{f", <a href=api/{m}.html>API</a>" if m else ""})</small></li>\n'
        for s, t, m in nbs) + "</ol>\n"
    toc += '<h2 id="api">API</h2>\n<ul>\n' + "".join(
        f'<li><a href="api/{m}.html"><code>{PKG}.{m}</code></a></li>\n' for m in modules) + "</ul>\n"
    idx = NBS / "index.ipynb"
    body = convert(idx, ex) if idx.exists() else "<h1>vlm-rlaif</h1>"
    (out / "index.html").write_text(page("vlm-rlaif", body + "\n<hr>\n" + toc), encoding="utf-8")
    return out, [s for s, _t, _m in nbs], modules


if __name__ == "__main__":
    import time
    t0 = time.time()
    out, nbs, mods = build(sys.argv[1] if len(sys.argv) > 1 else ROOT / "_docs")
    print(f"wrote {out}/index.html, {len(nbs)} notebook pages, {len(mods)} API pages in {time.time() - t0:.1f} s")
