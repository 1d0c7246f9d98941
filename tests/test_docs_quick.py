"""The documentation's quick blocks run as pasted, and the README stays a front page.

A fenced block whose info string is `bash quick` or `python quick` (GitHub shows the first word as
the language) in README.md or docs/*.md is a complete, offline example that runs in seconds. Each
runs here in a fresh temporary folder, never in the repository:
- the folder holds a copy of the repository's `configs/` (the blocks name `configs/demo_run.yaml`
  as a user in a checkout would), and the environment variable SAM_PEFT_REPO names the repository;
- python blocks run with this interpreter, the repository on PYTHONPATH;
- bash blocks run with `bash -euo pipefail`, this interpreter's bin folder (`sam-peft`) first on PATH;
- the Hugging Face hub is off (HF_HUB_OFFLINE), as on a machine without network, and torch uses one
  thread (OMP_NUM_THREADS=1 unless set).
A block fails the test when it exits non-zero, prints a Python traceback or runs past TIMEOUT_S; the
failure names the file and line of the block.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# The pages the README's front-page rules also hold for (fidelity.md, architecture.md and
# benchmarks.md keep their own tables).
OWN_PAGES = [README, *(ROOT / "docs" / f"{n}.md" for n in ("config", "methods", "sweeps", "library", "results",
                                                           "errors"))]
QUICK_LANGUAGES = ("bash", "python")
# Each block should take under ~30 s on a 2-core CPU; the limit leaves room for a busy machine.
TIMEOUT_S = 180
MAX_README_LINES = 150
MAX_CELL_CHARS = 200

FENCE = re.compile(r"^(`{3,}|~{3,})\s*(.*)$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of a Markdown page, with its info string's first word as the language
    (the second word, e.g. `quick`, is kept in `language` after a space)."""
    blocks, lines = [], page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, info = opening.group(1), opening.group(2).split()
        body, j = [], i + 1
        while j < len(lines) and not (lines[j].startswith(fence[0] * len(fence)) and
                                      not lines[j].strip().strip(fence[0])):
            body.append(lines[j])
            j += 1
        blocks.append(Block(page, i + 1, " ".join(info[:2]), "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def quick_blocks() -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page)
            if b.language in {f"{lang} quick" for lang in QUICK_LANGUAGES}]


def run_block(block: Block, tmp_path: Path) -> tuple[int, str, float]:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")
    env = dict(os.environ)
    # One intra-op thread unless told otherwise: these models are tiny, and several threads are much
    # slower when other processes share the cores (a test run beside an experiment).
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(SAM_PEFT_REPO=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               WANDB_DISABLED="true", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p))
    script = tmp_path / ("block.py" if block.language.startswith("python") else "block.sh")
    script.write_text(block.code, encoding="utf-8")
    command = ([sys.executable, str(script)] if block.language.startswith("python")
               else ["bash", "-euo", "pipefail", str(script)])
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, time.monotonic() - start
    return done.returncode, done.stdout + done.stderr, time.monotonic() - start


BLOCKS = quick_blocks()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_quick_block_runs_as_pasted(block: Block, tmp_path):
    status, output, seconds = run_block(block, tmp_path)
    tail = "\n".join(output.splitlines()[-40:])
    if status == -1:
        pytest.fail(f"{block.where}: the {block.language} block ran past {TIMEOUT_S} s\n{tail}", pytrace=False)
    if status != 0:
        pytest.fail(f"{block.where}: the {block.language} block failed (exit status {status}) after "
                    f"{seconds:.1f} s\n{tail}", pytrace=False)
    if "Traceback (most recent call last)" in output:
        pytest.fail(f"{block.where}: the {block.language} block printed a traceback\n{tail}", pytrace=False)


def test_the_snippets_that_must_be_quick_are():
    where = {(b.page.name, b.language) for b in BLOCKS}
    assert ("README.md", "bash quick") in where, "README: the one run + eval quickstart"
    assert ("README.md", "python quick") in where, "README: the Hugging Face Trainer quickstart"
    library = [b for b in BLOCKS if b.page.name == "library.md"]
    assert any("sam_peft.lib" in b.code for b in library), "docs/library.md: the sam_peft.lib snippet"
    assert any("sam_peft.hf" in b.code for b in library), "docs/library.md: the Trainer snippet"
    for b in BLOCKS:
        if "SparseFineTuning(" in b.code:
            assert 'save_strategy="no"' in b.code and "report_to=" in b.code, b.where
        if "from_pretrained(" in b.code and "sam_peft.lib" in b.code and "Trainer(" not in b.code:
            assert "model.train()" in b.code, f"{b.where}: from_pretrained returns a model in eval mode"


def test_fence_parser_reads_info_strings_and_lines(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n```python quick\nprint(1)\n```\n\n````bash\necho '```'\n````\n```yaml\na: 1\n```\n")
    blocks = fenced_blocks(page)
    assert [(b.line, b.language, b.code) for b in blocks] == [
        (2, "python quick", "print(1)\n"), (6, "bash", "echo '```'\n"), (9, "yaml", "a: 1\n")]


# ----------------------------------------------------------------------------- the README as a front page


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    # The set-up's two commands: CI (.ci/run) runs the second, the README's test command.
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
            "pip install -e '.[test]' && sam-peft sweep configs/demo.yaml && sam-peft table runs/demo") in text
    assert ". .venv/bin/activate && python -m pytest -q" in text
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in text
    for page in ("config", "methods", "sweeps", "library", "results", "errors", "fidelity", "architecture",
                 "benchmarks"):
        assert f"(docs/{page}.md" in text, f"the README's docs index lacks docs/{page}.md"


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines()
                if re.match(r"#{1,6} ", line)]
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_relative_links_resolve():
    link = re.compile(r"\]\(([^)\s]+)\)")
    broken = []
    for page in OWN_PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for target in link.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                linked = page.parent / path if path else page
                if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                    broken.append(f"{page.relative_to(ROOT)}:{n}: {target}")
    assert not broken, "\n".join(broken)


def test_table_cells_stay_short():
    long = []
    for page in OWN_PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("|"):
                long += [f"{page.relative_to(ROOT)}:{n}: {len(c.strip())} characters"
                         for c in re.split(r"(?<!\\)\|", line.strip().strip("|")) if len(c.strip()) > MAX_CELL_CHARS]
    assert not long, "\n".join(long)


def test_every_config_key_is_documented():
    from pydantic import BaseModel

    from sam_peft.config import RunConfig

    def keys(model: type[BaseModel], prefix: str = "") -> list[str]:
        out = []
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                out += keys(sub, f"{prefix}{name}.")
            else:
                out.append(prefix + name)
        return out

    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [k for k in keys(RunConfig) if f"`{k}`" not in text]
    assert not missing, f"docs/config.md does not document {missing}"
