"""bench/RESULTS.md, one section per benchmark module: each `write_section` replaces only its own section."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = (
    "# Benchmark results\n\n"
    "Written by `make bench`: each benchmark module (`python -m bench.NAME`) replaces its own section.\n"
)


def _markers(name: str) -> tuple[str, str]:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"section name {name!r} must be [A-Za-z0-9_.-]+")
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def write_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Put `markdown` in section `name` of `path`, replacing that section if present, else appending it."""
    begin, end = _markers(name)
    text = path.read_text() if path.exists() else _HEADER
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_section(name: str, path: Path = RESULTS) -> str | None:
    """The markdown of section `name`, or None."""
    begin, end = _markers(name)
    if not path.exists():
        return None
    m = re.search(re.escape(begin) + r"\n(.*?)" + re.escape(end), path.read_text(), re.DOTALL)
    return m.group(1).strip() if m else None


def cpu_model() -> str:
    """This machine's CPU as /proc/cpuinfo names it: the zoos train the same bytes per CPU kind only."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
