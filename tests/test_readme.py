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
    assert install_and_run == "pip install -e . && jaxunlearn demo"
    # The command is the installed console script, and `demo` one of its subcommands.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'jaxunlearn = "jaxunlearn.cli:main"' in pyproject
    from jaxunlearn.cli import _parser

    assert _parser().parse_args(["demo"]).command == "demo"
    assert install_and_test == "pip install -e '.[test]' && pytest"


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert readme_commands()[1] in ci_lines


def test_readme_python_example_runs_and_solves_the_damped_system():
    text = (ROOT / "README.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    params, inputs, targets = namespace["params"], namespace["inputs"], namespace["targets"]
    flat_params, unravel = ravel_pytree(params)
    flat_gradient = np.asarray(ravel_pytree(namespace["gradient"])[0])

    def flat_model(q):
        return namespace["model"](unravel(q), inputs).ravel()

    jacobian = np.asarray(jax.jacfwd(flat_model)(flat_params), np.float64)
    gauss_newton = 2 * jacobian.T @ jacobian / targets.size  # mean squared error's 2/N
    damped = gauss_newton + 1e-2 * np.eye(flat_params.size)
    solution = np.asarray(ravel_pytree(namespace["solution"].x)[0], np.float64)
    residual = np.linalg.norm(damped @ solution - flat_gradient) / np.linalg.norm(flat_gradient)
    assert residual <= 1e-4  # float32 CG with tol 1e-5 on the recursive residual

    loss = namespace["loss"]
    hessian = np.asarray(jax.hessian(lambda q: loss(unravel(q), (inputs, targets)))(flat_params))
    eigenvalues = np.linalg.eigvalsh(hessian.astype(np.float64))
    assert eigenvalues.min() < 0  # the example's point: the Hessian is indefinite here
    top = np.asarray(namespace["top"].eigenvalues)
    np.testing.assert_allclose(top[0], eigenvalues[-1], rtol=1e-3)
