"""scripts/python runs the interpreter scripts/setup.sh installed into: $PYTHON, the active virtual environment, or
the repository's .venv that setup.sh creates where the system Python is externally managed (PEP 668)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO



def _which(repo: Path, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    proc = subprocess.run([str(repo / "scripts" / "python"), "-c", "import sys; print(sys.prefix)"],
                          capture_output=True, text=True, env={**clean, **env}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_scripts_python_prefers_python_then_the_active_env_then_the_repo_venv(tmp_path):
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "python", repo / "scripts" / "python")
    system = _which(repo)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True, timeout=120)
    assert _which(repo) == str(repo / ".venv")  # what setup.sh made on a PEP 668 system
    assert _which(repo, VIRTUAL_ENV="/some/active/env") == system  # an active environment wins over .venv
    assert _which(repo, PYTHON=sys.executable) == sys.prefix


def test_setup_detects_an_externally_managed_python(tmp_path):
    """The check setup.sh runs, on a copy of this interpreter's stdlib marker: a Python whose stdlib holds
    EXTERNALLY-MANAGED and that is not a virtual environment is refused by pip, so setup.sh makes .venv."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    start = text.index("externally_managed() {")
    check = text[text.index("'", start) + 1:text.index("'\n}", start)]
    marker = Path(__import__("sysconfig").get_path("stdlib")) / "EXTERNALLY-MANAGED"
    expected = marker.is_file() and sys.prefix == sys.base_prefix
    assert (subprocess.run([sys.executable, "-c", check]).returncode == 0) == expected
    debian = Path("/usr/bin/python3")
    if debian.exists() and Path("/usr/lib/python3/dist-packages").is_dir():
        managed = subprocess.run([str(debian), "-c", "import sysconfig, os; print(os.path.isfile(os.path.join("
                                  "sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED')))"], capture_output=True,
                                 text=True).stdout.strip() == "True"
        assert (subprocess.run([str(debian), "-c", check]).returncode == 0) == managed
