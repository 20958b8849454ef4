"""Print one of README.md's two commands (section "The two commands"), exactly as README writes it.

Usage: python3 .ci/readme_commands.py main|test [README.md]

The section holds two fenced ``bash`` blocks: 1. install and run the main job, 2. install and run
the tests.  Each block must be one command line.  Exit code 1, with a message, if the section or
a block is missing, so that CI fails when README's commands break.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

SECTION = "## The two commands"


def commands(text: str) -> list[str]:
    start = text.find(SECTION)
    if start < 0:
        raise SystemExit(f"README.md has no section {SECTION!r}")
    end = text.find("\n## ", start + len(SECTION))
    section = text[start: end if end >= 0 else len(text)]
    blocks = re.findall(r"^\s*```bash\n(.*?)^\s*```", section, flags=re.S | re.M)
    found = [" ".join(line.strip() for line in block.strip().splitlines()) for block in blocks]
    if len(found) != 2 or not all(found):
        raise SystemExit(f"README.md section {SECTION!r} must hold exactly two ```bash blocks; found {len(found)}")
    return found


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    path = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parents[1] / "README.md"
    if which not in ("main", "test"):
        raise SystemExit("usage: readme_commands.py main|test [README.md]")
    main_job, test = commands(path.read_text(encoding="utf-8"))
    print(main_job if which == "main" else test)


if __name__ == "__main__":
    main()
