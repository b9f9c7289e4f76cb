"""Every ```python example in the guide runs, so the guide cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def pages() -> list[Path]:
    return sorted(p for p in [*DOCS.glob("*.md"), README] if BLOCK.search(p.read_text()))


def test_the_guide_has_runnable_examples() -> None:
    assert len(pages()) >= 3


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_page_examples_run(page: Path, tmp_path: Path) -> None:
    # A page's blocks run in order in one fresh interpreter, like a reader pasting them.
    blocks = BLOCK.findall(page.read_text())
    script = tmp_path / f"{page.stem}_examples.py"
    script.write_text("\n\n".join(blocks))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{page.name} examples failed:\n{result.stderr[-3000:]}"
