"""What the benchmarks share: each owns one `## ` section of benchmarks/RESULTS.md and rewrites only that."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_results(text: str, path: Path = RESULTS) -> None:
    """Replace the section whose heading is the first line of `text` (or append it), leaving the others alone."""
    heading = text.splitlines()[0]
    if not heading.startswith("## "):
        raise ValueError(f"a results section starts with a '## ' heading, not {heading!r}")
    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    text = text.rstrip("\n") + "\n"
    # A heading only counts at the start of a line: another section's prose may quote it.
    if old.startswith(heading + "\n"):
        start = 0
    else:
        found = old.find("\n" + heading + "\n")
        if found == -1:
            path.write_text(old.rstrip("\n") + "\n\n" + text, encoding="utf-8")
            return
        start = found + 1
    end = old.find("\n## ", start)
    rest = "\n" + old[end + 1:] if end != -1 else ""
    path.write_text(old[:start] + text + rest, encoding="utf-8")


def publish(text: str, write: bool) -> str:
    """Print a results section and, when asked, write it into RESULTS.md; give it back."""
    print(text)
    if write:
        write_results(text)
    return text
