"""The browsable site (`make docs`): built from the committed notebooks into a temporary folder, then opened in a
real headless browser (Debian's Chromium) when one is installed."""
import importlib.util, re, shutil, subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = sorted(p.stem for p in (ROOT / "nbs").glob("*.ipynb") if p.stem != "index")
MODS = sorted(p.stem for p in (ROOT / "vlm_rlaif").glob("*.py") if not p.stem.startswith("_"))
# a script or stylesheet, image, frame... fetched from the network
REMOTE = re.compile(r'<(?:script|link|img|iframe|source|embed)\b[^>]*\b(?:src|href)\s*=\s*["\']?(?:https?:)?//', re.I)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / ".ci" / "make_docs.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    out, nbs, mods = mod.build(tmp_path_factory.mktemp("docs"))
    assert nbs == NBS and mods == MODS
    return out


def test_pages_exist_and_are_linked(site):
    index = (site / "index.html").read_text()
    for s in NBS: assert (site / f"{s}.html").exists() and f'href="{s}.html"' in index, s
    for m in MODS: assert (site / "api" / f"{m}.html").exists() and f'href="api/{m}.html"' in index, m
    for p in [site / "index.html", *site.glob("*.html"), *(site / "api").glob("*.html")]:
        text = p.read_text()
        assert not REMOTE.search(text), f"{p.name} loads something from the network"
        assert "#| export" not in text and "#| hide" not in text and "#| default_exp" not in text, p.name
    assert "<svg" in index and "mermaid" in index  # the pipeline diagram, drawn locally, with its source
    from vlm_rlaif import frames
    api = (site / "api" / "frames.html").read_text()
    for name in frames.__all__: assert f'<dt id="{name}">' in api, name  # every public name, with its signature
    assert "def sample_indices(" in api and 'href="../00_frames.html"' in api


def figure_page(site):
    for s in ["05_sft", "01_toyworld", *NBS]:
        if 'src="data:image/' in (site / f"{s}.html").read_text(): return s
    pytest.fail("no notebook page has an embedded figure")


def dump_dom(browser, page, tmp_path):
    r = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000", "--dump-dom",
                        page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "<body" in r.stdout, r.stderr[-2000:]
    return r.stdout


def test_site_in_headless_browser(site, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        pytest.skip("no chromium on PATH: the site was built and checked as files, not in a browser "
                    "(install it with `apt-get install -y --no-install-recommends chromium`; .ci/run does as root)")
    dom = dump_dom(browser, site / "index.html", tmp_path)
    for s in NBS: assert f'href="{s}.html"' in dom, f"index does not link {s}"
    s = figure_page(site)
    dom = dump_dom(browser, site / f"{s}.html", tmp_path)
    assert re.search(r'<img\b[^>]*src="data:image/(png|jpeg|svg\+xml)', dom), f"{s}: no embedded figure in the DOM"
