"""Every snippet in README.md and docs/*.md runs as written.

Each ```python block runs as a file (so ``if __name__ == "__main__":`` guards and spawn
work) in a fresh interpreter, in an empty temporary directory, with no ``SHMSTORE_*``
variables, and must exit 0.  Every ``shmstore ...`` line of a ```bash or ```console block
must parse with the real argument parser, and every ``python some/file.py`` it names must
exist.  An HTML comment on the line just above a fence adapts the check, never silently:

- ``<!-- docs-test: continues -->``: the block runs after the previous python block(s) of
  the same file, in one program (a walk-through split by prose);
- ``<!-- docs-test: needs redis -->``: the test starts a Redis server and passes its URL
  in ``REDIS_URL`` (skipped, saying why, when ``redis-server`` is missing; a failure with
  ``SHMSTORE_REQUIRE_REDIS=1``);
- ``<!-- docs-test: needs module NAME -->``: skipped, saying so, when NAME is not
  importable.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from shmstore.cli.main import _parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"^<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
KNOWN_MARKS = re.compile(r"^(continues|needs redis|needs module [A-Za-z_][\w.]*)$")
SHELL_LANGS = {"bash", "sh", "shell", "console"}


@dataclasses.dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marks: list[str]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if fence is None:
            i += 1
            continue
        marks = []
        j = i - 1
        while j >= 0 and MARK.match(lines[j]):
            marks.append(MARK.match(lines[j]).group(1))  # type: ignore[union-attr]
            j -= 1
        end = i + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        out.append(Block(path, i + 1, fence.group(1).lower(), "\n".join(lines[i + 1:end]) + "\n",
                         marks))
        i = end + 1
    return out


ALL = [block for path in DOCS for block in _blocks(path)]
PYTHON = [block for block in ALL if block.lang == "python"]
SHELL = [block for block in ALL if block.lang in SHELL_LANGS]


def _program(block: Block) -> str:
    """The block's code, after the blocks it continues."""
    chain = [block]
    same_file = [b for b in PYTHON if b.path == block.path]
    index = same_file.index(block)
    while "continues" in chain[0].marks:
        index -= 1
        assert index >= 0, f"{block.name} continues, but no python block comes before it"
        chain.insert(0, same_file[index])
    return "\n".join(b.code for b in chain)


def test_the_docs_have_snippets_and_every_mark_is_known() -> None:
    assert len(PYTHON) >= 10 and SHELL  # the parser found the blocks
    bad = [(b.name, m) for b in ALL for m in b.marks if not KNOWN_MARKS.match(m)]
    assert bad == []


@pytest.fixture
def snippet_env(request: pytest.FixtureRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHMSTORE_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["MPLBACKEND"] = "Agg"
    block: Block = request.param
    for mark in block.marks:
        if mark.startswith("needs module "):
            module = mark.removeprefix("needs module ")
            if importlib.util.find_spec(module) is None:
                pytest.skip(f"{block.name} needs the module {module!r}, not installed here")
        elif mark == "needs redis":
            server = request.getfixturevalue("redis_server")
            server.flush()
            env["REDIS_URL"] = server.url
    return env


@pytest.mark.timeout(180)
@pytest.mark.parametrize("snippet_env", PYTHON, ids=[b.name for b in PYTHON], indirect=True)
def test_python_snippet_runs(snippet_env: dict[str, str], tmp_path: Path,
                             request: pytest.FixtureRequest) -> None:
    block: Block = request.node.callspec.params["snippet_env"]
    script = tmp_path / "snippet.py"
    script.write_text(_program(block), encoding="utf-8")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=snippet_env,
                         capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, (
        f"{block.name} exited {out.returncode}\n--- stdout\n{out.stdout[-2000:]}"
        f"\n--- stderr\n{out.stderr[-4000:]}")


def _commands(block: Block) -> list[list[str]]:
    """Each simple command of a shell block, as words, with VAR=value prefixes dropped."""
    commands = []
    for raw in block.code.splitlines():
        line = raw.strip()
        if block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        line = re.sub(r"(^|\s)#.*$", "", line)  # a comment
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words and words[0] != "export":
                commands.append(words)
    return commands


SHMSTORE_LINES = [(b, c) for b in SHELL for c in _commands(b)
                  if c[0] == "shmstore" or c[:3] == ["python", "-m", "shmstore"]]
PYTHON_LINES = [(b, c) for b in SHELL for c in _commands(b)
                if c[0] == "python" and len(c) > 1 and c[:3] != ["python", "-m", "shmstore"]]


def test_the_shell_blocks_name_shmstore_commands() -> None:
    assert len(SHMSTORE_LINES) >= 5 and PYTHON_LINES


@pytest.mark.parametrize(("block", "words"), SHMSTORE_LINES,
                         ids=[f"{b.name}:{' '.join(c)[:60]}" for b, c in SHMSTORE_LINES])
def test_shell_snippet_shmstore_line_parses(block: Block, words: list[str]) -> None:
    args = words[1:] if words[0] == "shmstore" else words[3:]
    try:
        parsed = _parser().parse_args(args)
    except SystemExit as exc:  # argparse has printed why
        pytest.fail(f"{block.name}: `{' '.join(words)}` does not parse (exit {exc.code})")
    assert callable(parsed.func)


@pytest.mark.parametrize(("block", "words"), PYTHON_LINES,
                         ids=[f"{b.name}:{' '.join(c)[:60]}" for b, c in PYTHON_LINES])
def test_shell_snippet_python_line_names_what_exists(block: Block, words: list[str]) -> None:
    if words[1] == "-m":
        assert importlib.util.find_spec(words[2]) is not None, (
            f"{block.name}: no module {words[2]!r}")
    else:
        assert (ROOT / words[1]).is_file(), f"{block.name}: {words[1]} does not exist"


def test_marks_chain_continued_blocks_and_are_read_from_above_the_fence(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("text\n```python\na = 1\n```\nmore\n<!-- docs-test: continues -->\n"
                   "<!-- docs-test: needs module json -->\n```python\nprint(a)\n```\n"
                   "```bash\nX=1 shmstore ls run-1 --limit 2  # a comment\n```\n")
    first, second, shell = _blocks(doc)
    assert (first.marks, first.code) == ([], "a = 1\n")
    assert sorted(second.marks) == ["continues", "needs module json"]
    assert (second.line, second.lang, shell.lang) == (8, "python", "bash")
    assert _commands(shell) == [["shmstore", "ls", "run-1", "--limit", "2"]]
    PYTHON.extend([first, second])
    try:
        assert _program(second) == "a = 1\n\nprint(a)\n"
    finally:
        del PYTHON[-2:]
