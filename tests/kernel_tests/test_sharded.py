"""On 8 fake CPU devices a sharded hvp and cg give the single-device answer.

XLA's device count is fixed when jax is first imported, so the check runs in a subprocess.
"""

import subprocess
import sys
import textwrap

import pytest
from multi_device import fake_devices_environment

pytestmark = pytest.mark.multi_device

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from jaxunlearn import kernels

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("fsdp", "tensor"))

    rng = np.random.default_rng(0)
    width, rank, tokens = 16, 4, 32
    base = jnp.asarray(rng.normal(size=(width, width)) / 4)
    params = {
        "a": jnp.asarray(rng.normal(size=(width, rank)) / 4),
        "b": jnp.asarray(rng.normal(size=(rank, width)) / 2),
        "scale": jnp.asarray(rng.normal(size=(width,))),
    }
    inputs = jnp.asarray(rng.normal(size=(tokens, width)))
    direction = jax.tree.map(lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)), params)

    def loss(p, x):
        hidden = jnp.tanh(x @ (base + p["a"] @ p["b"])) * p["scale"]
        return jnp.mean(jax.nn.logsumexp(hidden, axis=-1) - hidden[:, 0])

    def solve(p, x, v):
        product = kernels.hvp(loss, p, v, x)
        operator = kernels.linearize_gnvp(
            lambda q, y: jnp.tanh(y @ (base + q["a"] @ q["b"])) * q["scale"],
            lambda h, y: jnp.mean(jax.nn.logsumexp(h, axis=-1) - h[:, 0]),
            p, x,
        )
        solution = kernels.cg(operator, v, damping=0.1, tol=1e-12, max_steps=60)
        return product, solution.x, solution.status

    single = jax.jit(solve)(params, inputs, direction)

    specs = {"a": P("fsdp", "tensor"), "b": P("tensor", "fsdp"), "scale": P("fsdp")}
    def shard(tree):
        return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}

    sharded_params, sharded_direction = shard(params), shard(direction)
    sharded_inputs = jax.device_put(inputs, NamedSharding(mesh, P("fsdp", None)))
    assert len(sharded_params["a"].addressable_shards) == 8
    assert sharded_params["a"].addressable_shards[0].data.shape == (width // 4, rank // 2)
    out_shardings = ({k: NamedSharding(mesh, s) for k, s in specs.items()},) * 2 + (None,)
    sharded = jax.jit(solve, out_shardings=out_shardings)(
        sharded_params, sharded_inputs, sharded_direction
    )

    assert int(single[2]) == 0 and int(sharded[2]) == 0, (single[2], sharded[2])
    assert sharded[0]["a"].sharding.spec == P("fsdp", "tensor")
    for name in params:
        for index in (0, 1):
            want, got = np.asarray(single[index][name]), np.asarray(sharded[index][name])
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert error <= 1e-12, (index, name, error)
    print("SHARDED_OK")
    """
)


def test_sharded_hvp_and_cg_match_single_device():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=fake_devices_environment(8),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "SHARDED_OK" in result.stdout
