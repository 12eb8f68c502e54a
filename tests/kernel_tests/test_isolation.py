"""kernels depends only on jax: importing it loads no flax, optax, torch or jaxunlearn."""

import json
import subprocess
import sys


def test_importing_kernels_loads_only_jax():
    script = (
        "import json, sys; import kernels; "
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "jax" in loaded
    forbidden = {"flax", "optax", "orbax", "torch", "transformers", "jaxunlearn", "chex"}
    assert loaded.isdisjoint(forbidden), loaded & forbidden
