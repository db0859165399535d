"""The README cannot drift from what CI, the Makefile and the config model do."""

import re
from pathlib import Path

from spin_core.config_reference import reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands():
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("#")[0].strip() for line in block.strip().splitlines()]


def test_readme_starts_with_the_demo_and_test_commands():
    assert _readme_commands() == ["make demo", "make test"]


def test_ci_runs_the_readme_test_command_and_nothing_else():
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert lines == ["make test"]


def test_makefile_installs_cpu_torch_before_the_project():
    makefile = (ROOT / "Makefile").read_text()
    assert makefile.index("pip install torch==2.13.0") < makefile.index("pip install -e '.[test]'")
    assert re.search(r"^demo: setup\n\t\$\(BIN\)/spin demo$", makefile, re.M)
    assert re.search(r"^test: lint\n\t\$\(BIN\)/pytest", makefile, re.M)


def test_config_reference_is_generated_from_the_model():
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- config-reference:start -->\n")[1].split(
        "<!-- config-reference:end -->"
    )[0]
    assert section.strip() == reference_markdown().strip()


def _readme_runs() -> list[tuple[str, list[str]]]:
    """(config, --set overrides) of every `spin run` / `spin check` command the README shows,
    continuation lines joined."""
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    found = []
    for match in re.finditer(r"spin (?:run|check) (configs/\S+\.yaml)([^\n`']*)", text):
        found.append((match.group(1), re.findall(r"--set (\S+)", match.group(2))))
    return found


def test_every_config_the_readme_shows_loads():
    from spin_core.config import load_config

    commands = _readme_runs()
    assert any("training.num_nodes=2" in sets for _, sets in commands)  # the Slurm example
    for config, sets in commands:
        load_config(ROOT / config, sets)  # raises ConfigError naming the field
