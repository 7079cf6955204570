"""Write README.md from nbs/index.ipynb (Quarto, hence nbdev_readme, is unavailable here).

Markdown cells are copied as they are; code cells become fenced python blocks with their text outputs."""
from pathlib import Path
import nbformat
from nbconvert import MarkdownExporter

root = Path(__file__).resolve().parents[1]
nb = nbformat.read(root / "nbs" / "index.ipynb", as_version=4)
nb.cells = [c for c in nb.cells if not c.source.lstrip().startswith(("#| hide", "#|hide"))]
body, _ = MarkdownExporter().from_notebook_node(nb)
header = "<!-- Generated from nbs/index.ipynb by .ci/make_readme.py (make readme): do not edit by hand. -->\n\n"
text = header + body.strip() + "\n"
out = root / "README.md"
if not out.exists() or out.read_text() != text:
    out.write_text(text)
