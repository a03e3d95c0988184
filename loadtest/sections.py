"""Generated sections of a hand-written Markdown file (docs/benchmarks.md): each benchmark
rewrites only the part between its own BEGIN/END markers. Standard library only, so the
GPU script can use it on a machine without the service's packages."""

from __future__ import annotations

from pathlib import Path


def replace_section(
    path: Path, section: str, begin: str, end: str, new_file: str = "# Benchmarks\n"
) -> None:
    """Put `section` (starting with `begin`, ending with `end`) in place of the one between
    those markers in path, keeping the rest; append it if absent (to `new_file` if path
    does not exist yet)."""
    text = path.read_text() if path.is_file() else new_file
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + section.rstrip("\n") + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


__all__ = ["replace_section"]
