"""The README's commands are true: they parse, and they point at what the main job writes."""

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
MAIN_JOB = (REPO / "examples" / "train_rm_bilingual.sh").read_text(encoding="utf-8")


def _commands(module: str) -> list[list[str]]:
    """Every ``python3 -m <module> ...`` command in the README's bash blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("|")[-1].strip()
            if line.startswith(f"python3 -m {module} "):
                out.append(shlex.split(line)[3:])
    return out


def _main_job_save_path() -> str:
    return re.search(r'--save_path "\$\{SAVE_PATH:-([^}]+)\}"', MAIN_JOB).group(1)


@pytest.mark.parametrize("module", ["coati.evaluate", "coati.score"])
def test_readme_commands_parse_and_use_the_main_jobs_export(module):
    import importlib

    parser = importlib.import_module(module).build_parser()
    commands = _commands(module)
    assert commands, module
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.model_path == _main_job_save_path(), argv


def test_readme_evaluates_the_held_out_pairs():
    assert any("--heldout" in argv for argv in _commands("coati.evaluate"))


def test_main_job_excerpt_names_the_folder_the_command_writes():
    excerpt = README[README.index("## Main job output"):README.index("## Use")]
    exported = re.findall(r"exported to (\S+) \(", excerpt)
    assert exported == [_main_job_save_path()]


def test_the_grpo_snippet_says_how_to_install_trl():
    before = README[:README.index("from trl import")][-300:]  # setup.sh does not install TRL
    assert "pip install -c constraints.txt trl" in before
