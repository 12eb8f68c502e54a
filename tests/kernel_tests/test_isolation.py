"""The kernels depend only on jax: importing them loads no flax, optax, torch or transformers,
and nothing of jaxunlearn beyond the package's (empty) root and the kernels themselves."""

import json
import subprocess
import sys


def test_importing_kernels_loads_only_jax():
    script = (
        "import json, sys; from jaxunlearn import kernels; print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    top_level = {name.split(".")[0] for name in loaded}
    assert "jax" in top_level
    forbidden = {"flax", "optax", "orbax", "torch", "transformers", "chex"}
    assert top_level.isdisjoint(forbidden), top_level & forbidden
    ours = {name for name in loaded if name.split(".")[0] == "jaxunlearn"}
    assert "jaxunlearn.kernels" in ours
    outside = {
        name for name in ours if name != "jaxunlearn" and not name.startswith("jaxunlearn.kernels")
    }
    assert not outside, outside
