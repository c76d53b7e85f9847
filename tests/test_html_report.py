"""report.html: self-contained (every figure inlined as a PNG), well formed, and rendered by a real browser
(headless Chromium, when it is installed: `apt-get install chromium`; `make test-browser` does it)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from bayeslora.cli import main

VOID = {"meta", "img", "br", "hr", "link", "input"}


class _Balance(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"unexpected </{tag}> (open: {self.stack[-3:]})")
        else:
            self.stack.pop()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory, tiny_llama_dir):
    """Two toy runs (LoRA and B-LoRA), one temperature-scaled, reported together."""
    root = tmp_path_factory.mktemp("html")
    rows = [{"question": f"Item {i}: which word?", "choices": ["apple", "river"], "answer": i % 2} for i in range(24)]
    task = root / "toy.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(tiny_llama_dir), "--task", str(task), "--eval-tasks", str(task), "--rank", "2",
              "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--train-size", "8"]  # fmt: skip
    for method in ("lora", "blora"):
        assert main(["--quiet", "train", *common, "--method", method, "--output-dir", str(root / method)]) == 0
    assert main(["--quiet", "calibrate", "--run", str(root / "lora"), "--heldout", "8"]) == 0
    assert (
        main(["--quiet", "report", str(root / "lora"), str(root / "blora"), "--output-dir", str(root / "report")]) == 0
    )
    return root / "report"


def test_report_html_is_self_contained_and_well_formed(report_dir):
    page = (report_dir / "report.html").read_text()
    parser = _Balance()
    parser.feed(page)
    assert not parser.errors and not parser.stack
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 4  # reliability, accuracy-ECE, step cost, B-LoRA structure
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "lora+ts" in page and "blora" in page and "Learned structure" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing refers to a file next to it


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(report_dir):
    import matplotlib.image

    shot = report_dir / "screenshot.png"
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={report_dir / 'profile'}",
        "--window-size=1200,2400", f"--screenshot={shot}", (report_dir / "report.html").as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 2000 and pixels.shape[1] >= 1100
    assert pixels[..., :3].std() > 0.05  # text, tables and figures, not a blank page
