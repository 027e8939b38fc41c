"""The README and the documentation site (docs/, mkdocs.yml) cannot drift from the code: every
link and image resolves (anchors included), every symbol they name exists, every page is in the
site's navigation, and the code blocks marked `<!-- runnable -->` run. CI also builds the site
with `mkdocs build --strict` (.ci/run)."""
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import mae_kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FILES = [ROOT / "README.md", *PAGES]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
RUNNABLE = re.compile(r"<!-- runnable(?::\s*([^>]*?))?\s*-->\n```python\n(.*?)^```", re.M | re.S)
SYMBOL = re.compile(r"`((?:mae_kernels|mae)(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`")


def name(path: Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name)


def prose(path: Path) -> str:
    """The file without its code blocks (whose brackets are code, not links)."""
    return FENCE.sub("", path.read_text())


def slug(heading: str) -> str:
    """The anchor mkdocs' toc extension (and GitHub) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text)).strip("-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", prose(path), re.M)}


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(re.sub(r"`[^`\n]*`", "", prose(path))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif path.is_relative_to(DOCS) and not resolved.is_relative_to(DOCS):
            broken.append(f"{target}: outside docs/, which the site cannot serve")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {name(resolved)}")
    return broken


@pytest.mark.parametrize("path", FILES, ids=name)
def test_links_and_images_resolve(path):
    assert broken_links(path) == []


def test_a_broken_link_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path / "docs")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Its `part`\n")
    (tmp_path / "outside.md").write_text("# Outside\n")
    page = tmp_path / "docs" / "b.md"
    page.write_text("[ok](a.md#its-part) [gone](c.md) [no anchor](a.md#nothing) `[code](x.md)`\n"
                    "```\n[in a block](y.md)\n```\n[out](../outside.md) ![img](a.png)\n")
    assert broken_links(page) == [
        "c.md: no such file", "a.md#nothing: no heading #nothing in a.md",
        "../outside.md: outside docs/, which the site cannot serve", "a.png: no such file"]


def resolve(dotted: str):
    """The object a dotted name names: the longest importable module, then attributes. The C++
    extension (`mae_kernels._C`) is a library torch loads, not a Python module: its ops."""
    if dotted == "mae_kernels._C":
        return torch.ops.mae_kernels.gather_tokens
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def symbols(path: Path) -> set[str]:
    text = path.read_text()
    return set(SYMBOL.findall(text)) | set(re.findall(r"^::: ([\w.]+)", text, re.M))


@pytest.mark.parametrize("path", FILES, ids=name)
def test_named_symbols_exist(path):
    missing = []
    for dotted in sorted(symbols(path)):
        try:
            resolve(dotted)
        except (ImportError, AttributeError) as error:
            missing.append(f"{dotted}: {error}")
    assert missing == []


def test_a_missing_symbol_is_found():
    assert resolve("mae_kernels.integrations.patch_lightly")
    with pytest.raises(AttributeError):
        resolve("mae_kernels.integrations.patch_nothing")


def test_every_page_is_in_the_navigation_and_every_entry_is_a_page():
    def entries(nav):
        for item in nav:
            for value in item.values():
                yield from entries(value) if isinstance(value, list) else [value]

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert sorted(entries(config["nav"])) == sorted(str(p.relative_to(DOCS)) for p in PAGES)
    for snippet in re.findall(r'^--8<-- "([^"]+)"', "".join(p.read_text() for p in PAGES), re.M):
        assert (ROOT / snippet).is_file(), snippet


def test_readme_is_an_overview_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    assert ("bash scripts/setup.sh && python3 -m pytest tests benchmarks --benchmark-disable -n 2"
            in readme)  # the command .ci/run runs
    assert "bash scripts/setup.sh && mae pretrain --norm-pix-loss --output-dir runs/demo" in readme
    assert RUNNABLE.search(readme), "the README's drop-in example is not marked runnable"


@pytest.mark.parametrize("path", [p for p in FILES if RUNNABLE.search(p.read_text())], ids=name)
def test_runnable_blocks_run(path, tmp_path, monkeypatch):
    """Each page's runnable blocks, in order, in one namespace (as a reader would paste them)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for needs, code in RUNNABLE.findall(path.read_text()):
        for module in filter(None, (m.strip() for m in needs.split(","))):
            pytest.importorskip(module)
        exec(compile(code, f"{name(path)} (runnable block)", "exec"), namespace)


def test_mae_version_is_the_single_sourced_version():
    out = subprocess.run([sys.executable, "-m", "mae.cli", "--version"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"mae-kernels {mae_kernels.__version__}"
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = { attr = "mae_kernels._version.__version__" }' in pyproject
    assert 'dynamic = ["version"]' in pyproject
    assert f"## [{mae_kernels.__version__}]" in (ROOT / "CHANGELOG.md").read_text()
    assert f'version: "{mae_kernels.__version__}"' in (ROOT / "CITATION.cff").read_text()
