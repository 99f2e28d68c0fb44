# The docs stay true to the repository: python3 -m pytest -q tests/test_docs.py
"""docs/settings.md is what tools/settings_doc.py generates from Hyperparameters; README.md stays a front
page (at most 16,000 bytes) whose first bash block holds the test command CI runs; every relative link
and every cited repository path in README.md and docs/ exists; no page cites files a clone lacks."""

import ast
import glob
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import file_shape  # noqa: E402
import settings_doc  # noqa: E402

PAGES = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
HAND_WRITTEN = [p for p in PAGES if p != settings_doc.OUTPUT]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# A path in backticks under one of the repository's folders: `logs/bench/x.txt`, `tests/test_ttt.py`.
CITED_PATH = re.compile(r"`((?:logs|bench|tests|tools|docs)/[^`\s]*)`")


def test_settings_page_is_generated():
    assert settings_doc.OUTPUT.read_text(encoding="utf-8") == settings_doc.render(), (
        "docs/settings.md differs from Hyperparameters: regenerate with `python3 tools/settings_doc.py --write`")


def test_readme_is_a_front_page():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 16_000, f"README.md is {size:,} bytes; move detail to docs/ (the limit is 16,000)"


def test_readme_first_bash_block_has_ci_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert block and ci in [line.split("#")[0].strip() for line in block.group(1).splitlines()], (
        f"README.md's first bash block must hold CI's test command {ci!r}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if REPO not in path.parents and path != REPO or not path.exists():
            broken.append(target)
    assert not broken, f"{page.name}: links to files the repository lacks: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_cited_paths_exist(page):
    """A number's source must be a file a clone has: `logs/...` and the like, globs allowed."""
    missing = [cited for cited in CITED_PATH.findall(page.read_text(encoding="utf-8"))
               if "<" not in cited and not glob.glob(str(REPO / cited.rstrip("/")))]
    assert not missing, f"{page.name}: cites paths the repository lacks: {missing}"


CODE_AND_DOCS = PAGES + sorted((REPO / "docs" / "notes").glob("*.md")) + [
    p for folder in ("", "bench", "tools", "tests") for p in sorted((REPO / folder).glob("*.py"))
    if p.name != "test_docs.py"]


@pytest.mark.parametrize("page", CODE_AND_DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_files_a_clone_lacks(page):
    text = page.read_text(encoding="utf-8")
    for name in ("FRONTIER.md", "CHALLENGE.md"):
        assert name not in text, f"{page.name} cites {name}, which a clone lacks: cite the PR number instead"


def test_generator_prints_without_write():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "settings_doc.py")], capture_output=True,
                         text=True, check=True).stdout
    assert out == settings_doc.render()


def test_generator_reads_the_comment_convention():
    source = '''
import dataclasses
@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    # Data. Where the shards are.
    data_path: str = "x"  # folder of shards
    mode: str = "a"  # a: one thing
    # | b: another
    # Second group.
    # More words.
    steps: int = 3
    # ... continued: same group.
    flag: bool = False

    @property
    def later(self) -> int:
        # not read
        return 1
'''
    defaults = {"data_path": "x", "mode": "a", "steps": 3, "flag": False}
    groups = settings_doc.read_groups(source, defaults)
    assert [(g.heading, g.paragraph) for g in groups] == [
        ("Data", ["Where the shards are."]), ("Second group", ["More words. ... continued: same group."])]
    assert groups[0].rows == [("DATA_PATH", "`x`", "folder of shards"), ("MODE", "`a`", "a: one thing | b: another")]
    assert groups[1].rows == [("STEPS", "3", ""), ("FLAG", "0", "")]


def test_readme_quick_start_installs_a_cpu_torch_and_keeps_a_pods():
    """Issue 24 item 8: on a CPU machine the first command must not pull a multi-GB CUDA torch (the CPU
    wheel's index comes first), pytest is installed, and requirements.txt accepts a pod's pre-release
    torch (NGC's 2.6.0a0+...) instead of replacing it."""
    from packaging.requirements import Requirement
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    cpu = next(i for i, c in enumerate(commands) if c.startswith("pip install torch "))
    assert "--index-url https://download.pytorch.org/whl/cpu" in commands[cpu]
    requirements = next(i for i, c in enumerate(commands) if "-r requirements.txt" in c)
    assert cpu < requirements and "pytest" in commands[requirements].split()
    torch_line = next(line for line in (REPO / "requirements.txt").read_text().splitlines() if line.startswith("torch"))
    spec = Requirement(torch_line).specifier
    assert spec.contains("2.6.0a0+ecf3bae40a.nv25.01", prereleases=True) and spec.contains("2.13.0")
    assert not spec.contains("2.5.1")


def test_the_file_shape_tool_sees_the_sections_in_the_genres_order_and_every_capability():
    """STYLE.md's fixed order: config, optimizer, data, model, evaluation, (TTT), quantization, averaging, training,
    main; tools/file_shape.py's capability table names only definitions the script has (a stale name is a failure)."""
    source = (REPO / "train_gpt.py").read_text(encoding="utf-8")
    names = [name for name, _, _ in file_shape.sections(source.splitlines())]
    assert names == ["header+imports", "Configuration", "Muon optimizer", "Data", "Model", "Evaluation",
                     "Score-first test-time training (TTT)", "Quantization and serialization", "Weight averaging",
                     "Training loop", "Main"]
    defined = file_shape.definition_lines(ast.parse(source))
    stale = [n for _, names in file_shape.CAPABILITIES.values() for n in names.split() if n not in defined]
    assert not stale, f"tools/file_shape.py names definitions train_gpt.py lacks: {stale}"
    out = subprocess.run([sys.executable, str(REPO / "tools/file_shape.py")], capture_output=True, text=True, check=True)
    assert "in all" in out.stdout and "not in this version" not in out.stdout


def test_the_file_shape_tool_counts_layout_lines_that_joining_a_statement_would_save():
    """joinable_lines: a call over three lines that fits in 120 columns saves 2 lines; one that would not fit saves
    none (its 2 continuation lines still count); a statement holding a comment is left out."""
    assert file_shape.joinable_lines("x = f(\n    1,\n    2)\n") == (2, 2)
    long = "x = f(\n    " + "a" * 60 + ",\n    " + "b" * 60 + ")\n"
    assert file_shape.joinable_lines(long) == (2, 0)
    assert file_shape.joinable_lines("y = [\n    3,  # why\n    4]\n") == (0, 0)
