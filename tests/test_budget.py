"""The project's size budgets, checked on every test run so that they keep holding as work lands.

A reader should be able to read each file in one sitting (shared/notes/style.md): at most 650 code
lines in train.py and diagnose.py, 600 in every other module; no line over 110 characters; at least
a quarter of the non-blank lines of the two scripts are comments or docstrings (they are read next
to the paper); a README of at most 300 lines; and nothing at the top of the repository beyond the
README, the requirements, the six modules, tests/ and .ci/.

Code lines are counted by ../shared/tools/codelines.py (the tool the budgets were set with): lines
holding a token that is not a comment, a docstring or layout. Without it those tests are skipped.
"""

import importlib.util
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODELINES = os.path.join(ROOT, "..", "shared", "tools", "codelines.py")
SCRIPTS = ("train.py", "diagnose.py")
MODULES = ("model.py", "weighter.py", "bilevel.py", "data.py")
MAX_CODE_LINES = {**{m: 650 for m in SCRIPTS}, **{m: 600 for m in MODULES}}
MAX_LINE = 110
MIN_COMMENT_SHARE = 0.25
MAX_README_LINES = 300
TOP_LEVEL = {"README.md", "requirements.txt", *SCRIPTS, *MODULES, "tests", ".ci", ".gitignore"}


@pytest.fixture(scope="module")
def measure():
    """codelines.measure(path) → (code lines, comment+docstring share of non-blank lines, wide lines)."""
    if not os.path.isfile(CODELINES):
        pytest.skip(f"no {os.path.normpath(CODELINES)} to count code lines with")
    spec = importlib.util.spec_from_file_location("codelines", CODELINES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure


@pytest.mark.parametrize("name", [*SCRIPTS, *MODULES])
def test_code_lines_within_budget(measure, name):
    code, _, _ = measure(os.path.join(ROOT, name))
    assert code <= MAX_CODE_LINES[name], f"{name}: {code} code lines, budget {MAX_CODE_LINES[name]}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_are_at_least_a_quarter_comments_and_docstrings(measure, name):
    _, share, _ = measure(os.path.join(ROOT, name))
    assert share >= MIN_COMMENT_SHARE, \
        f"{name}: {share:.1%} comments and docstrings, at least {MIN_COMMENT_SHARE:.0%}"


@pytest.mark.parametrize("name", [*SCRIPTS, *MODULES])
def test_no_line_over_110_characters(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        wide = [(i, len(l)) for i, l in enumerate(f.read().splitlines(), 1) if len(l) > MAX_LINE]
    assert not wide, f"{name}: lines over {MAX_LINE} characters (line, length): {wide[:10]}" + \
        (f" and {len(wide) - 10} more" if len(wide) > 10 else "")


def test_readme_within_budget():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= MAX_README_LINES, f"README.md: {n} lines, budget {MAX_README_LINES}"


def test_top_level_holds_only_the_project_files():
    """What git tracks at the top (untracked and ignored files, such as runs/ or out/, do not count)."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    res = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"git ls-files failed: {res.stderr.strip()}")
    top = {p.split("/", 1)[0] for p in res.stdout.split("\0") if p}
    assert top <= TOP_LEVEL, f"unexpected at the top of the repository: {sorted(top - TOP_LEVEL)}"
