"""CI runs README's two commands as README writes them (read from README.md, not copied)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "readme_commands.py"


def readme_command(which: str, readme: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT), which] + ([str(readme)] if readme else [])
    return subprocess.run(args, capture_output=True, text=True)


def test_ci_reads_both_commands_from_readme():
    test = readme_command("test")
    main = readme_command("main")
    assert test.returncode == 0 and main.returncode == 0
    text = (REPO / "README.md").read_text()
    assert test.stdout.strip() in text and main.stdout.strip() in text  # verbatim, one line each
    assert "pytest" in test.stdout and "DFKD_DATA=" in test.stdout
    assert "dfkd-bench run --grid" in main.stdout
    code = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if not line.lstrip().startswith("#")]
    assert any("readme_commands.py test" in line for line in code)
    assert any("readme_commands.py main" in line for line in code)
    assert not any("pytest" in line for line in code)  # no copy of the test command


def test_a_readme_without_its_two_commands_fails_ci(tmp_path):
    broken = tmp_path / "README.md"
    broken.write_text("# x\n\n## The two commands\n\n```bash\npip install .\n```\n")
    out = readme_command("test", broken)
    assert out.returncode != 0 and "exactly two" in out.stderr
