"""The README's two set-up commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("pip ")]


def test_readme_has_an_install_and_run_command_and_a_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    script = install_and_run.split("&& python ", 1)[1].split()[0]
    assert (ROOT / script).is_file(), script
    assert install_and_test == "pip install -e '.[test]' && pytest"


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines
