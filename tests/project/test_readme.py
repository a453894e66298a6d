"""The README's and the docs pages' commands are true: they parse, and they point at what the main job writes; the
README keeps the two fresh-machine commands, and the links between the pages resolve."""

import re
import shlex

import pytest

from helpers import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
DOCS = {f"docs/{p.name}": p.read_text(encoding="utf-8") for p in sorted((REPO / "docs").glob("*.md"))}
PAGES = {"README.md": README, **DOCS}
TRAINING = DOCS["docs/training.md"]
MAIN_JOB = (REPO / "examples" / "train_rm_bilingual.sh").read_text(encoding="utf-8")

#: The README's two commands for a fresh machine: set up and run the main job; set up and run the tests (.ci/run).
FRESH_MACHINE = (
    "bash scripts/setup.sh && bash examples/train_rm_bilingual.sh",
    "bash scripts/setup.sh && bash scripts/install_colossalai.sh && COATI_DATA_DIR=../shared/data scripts/python -m "
    "pytest -q -n 2 --dist loadfile tests",
)


def _commands(module: str, text: str = README) -> list[list[str]]:
    """Every ``python3 -m <module> ...`` command in ``text``'s bash blocks (continuations joined)."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("|")[-1].strip()
            if line.startswith(f"python3 -m {module} "):
                out.append(shlex.split(line)[3:])
    return out


def _main_job_save_path() -> str:
    return re.search(r'--save_path "\$\{SAVE_PATH:-([^}]+)\}"', MAIN_JOB).group(1)


def _section(text: str, heading: str) -> str:
    """``text`` from the line ``heading`` to the next heading of the same or a higher level (not in code blocks)."""
    lines = text.split("\n")
    start = lines.index(heading)
    level, fenced = len(heading.split(" ")[0]), False
    for end in range(start + 1, len(lines)):
        fenced ^= lines[end].startswith("```")
        hashes = re.match(r"(#+) ", lines[end])
        if not fenced and hashes and len(hashes.group(1)) <= level:
            return "\n".join(lines[start:end])
    return "\n".join(lines[start:])


def test_readme_keeps_the_fresh_machine_commands():
    blocks = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    for command in FRESH_MACHINE:
        assert command in blocks, command


@pytest.mark.parametrize("module", ["coati.evaluate", "coati.score"])
def test_readme_commands_parse_and_use_the_main_jobs_export(module):
    import importlib

    parser = importlib.import_module(module.replace("coati.", "coati.cli.")).build_parser()  # -m coati.X runs it
    commands = _commands(module)
    assert commands, module
    for page, text in PAGES.items():  # the docs pages' commands too
        for argv in _commands(module, text):
            args = parser.parse_args(argv)
            assert args.model_path == _main_job_save_path(), (page, argv)


def test_readme_evaluates_the_held_out_pairs():
    assert any("--heldout" in argv for argv in _commands("coati.evaluate"))


@pytest.mark.parametrize("page, heading", [("docs/training.md", "## Main job output (real excerpt)"),
                                           ("README.md", "### Train")])  # the whole excerpt; the tour's lines of it
def test_main_job_excerpt_names_the_folder_the_command_writes(page, heading):
    excerpt = _section(PAGES[page], heading)
    exported = re.findall(r"exported to (\S+) \(", excerpt)
    assert exported == [_main_job_save_path()]


def test_the_grpo_snippet_says_how_to_install_trl():
    pages = [text for text in PAGES.values() if "from trl import" in text]
    assert pages
    for text in pages:
        before = text[:text.index("from trl import")][-300:]  # setup.sh does not install TRL
        assert "pip install -c constraints.txt trl" in before


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_links_between_the_pages_resolve():
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (REPO / page).parent / path if path else REPO / page
            assert file.exists(), (page, target)
            if anchor:
                assert anchor in _anchors(file.read_text(encoding="utf-8")), (page, target)


def test_the_layout_page_names_every_module_of_the_package():
    """docs/layout.md is the package's plan: every module under coati/ is named there (its path, or its file name in
    its folder's entry), and every coati/ path it names exists."""
    layout = DOCS["docs/layout.md"]
    block = re.search(r"```\n(.*?)```", layout, flags=re.S).group(1)
    entries: dict[str, str] = {}  # first column (a path, or "coati/a.py, b.py" for several) -> its text
    head = None
    for line in block.splitlines():
        if line and not line[0].isspace():
            head, _, text = line.partition("  ")
            entries[head] = text
        elif head is not None:
            entries[head] += " " + line.strip()
    missing = []
    for path in sorted((REPO / "coati").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(REPO).as_posix()
        parent = rel.rsplit("/", 1)[0] + "/"
        names = [n.strip() for h in entries for n in h.split(",")]
        listed = rel in names or any(h.startswith(parent) and "," in h and path.name in [n.strip() for n in
                                     h.replace(parent, "").split(",")] for h in entries)
        in_folder = re.search(rf"\b{re.escape(path.name)}\b", entries.get(parent, "")) is not None
        if not (listed or in_folder):
            missing.append(rel)
    assert not missing, f"docs/layout.md does not name {missing}"
    for named in re.findall(r"\bcoati/[\w/]+(?:\.py|/)", block):
        assert (REPO / named).exists(), f"docs/layout.md names {named}, which does not exist"
