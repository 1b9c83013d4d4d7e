"""docs/api.md's and docs/transformers.md's Python blocks run in order in one namespace per page
and print what the docs show.

An output block (a fence without a language) right after a Python block is what that block
prints.  A block preceded by an ``<!-- not run: why -->`` line is skipped (too slow, or it
needs data the docs do not have); nothing else is.
"""
import contextlib
import io
import logging
import re
import tempfile
from pathlib import Path

import pytest

import hfp_fx

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"^<!--\s*not run:.*-->$")


def python_blocks(text):
    """``(source, expected output or None, skipped)`` for every ```python block, in order."""
    fences = list(FENCE.finditer(text))
    found = []
    for i, m in enumerate(fences):
        if m.group(1) != "python":
            continue
        before = text[:m.start()].rstrip().splitlines()
        skipped = bool(before) and bool(NOT_RUN.match(before[-1].strip()))
        nxt = fences[i + 1] if i + 1 < len(fences) else None
        follows = nxt is not None and nxt.group(1) == "" and not text[m.end():nxt.start()].strip()
        found.append((m.group(2), nxt.group(2) if follows else None, skipped))
    return found


def test_block_parser():
    text = ("```python\nprint(1)\n```\n\n```\n1\n```\n\nprose\n\n```\nsignature()\n```\n\n"
            "<!-- not run: needs data -->\n```python\nloader\n```\n\n```python\nx = 2\n```\ntext\n```\nnot output\n```\n")
    assert python_blocks(text) == [("print(1)\n", "1\n", False), ("loader\n", None, True), ("x = 2\n", None, False)]


def run_page(doc, tmp_path, monkeypatch):
    """Run every Python block of ``doc`` that is not skipped; return (blocks run, outputs compared)."""
    blocks = python_blocks(doc.read_text())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' temporary files
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    saved_logging = (root.level, list(root.handlers))
    namespace = {"__name__": doc.stem + "_md"}
    ran = compared = 0
    try:
        for k, (source, expected, skipped) in enumerate(blocks):
            if skipped:
                continue
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(source, f"{doc.name}, python block {k}", "exec"), namespace)
            ran += 1
            if expected is not None:
                assert printed.getvalue().rstrip("\n") == expected.rstrip("\n"), f"python block {k}:\n{source}"
                compared += 1
    finally:
        hfp_fx.set_progress(None)  # api.md's last block switches progress bars off
        root.setLevel(saved_logging[0])
        root.handlers[:] = saved_logging[1]
    assert ran == sum(not skipped for _, _, skipped in blocks)
    return ran, compared


def test_api_md_examples_run_and_print_what_the_docs_show(tmp_path, monkeypatch):
    ran, compared = run_page(DOCS / "api.md", tmp_path, monkeypatch)
    assert ran >= 20 and compared >= 18


def test_transformers_md_examples_run_and_print_what_the_docs_show(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ran, compared = run_page(DOCS / "transformers.md", tmp_path, monkeypatch)
    assert ran >= 6 and compared >= 6
