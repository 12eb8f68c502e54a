"""Sharding rules, and a sharded forward/LoRA gradient on 8 fake CPU devices."""

import json
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P
from multi_device import fake_devices_environment

from jaxunlearn import parallel
from jaxunlearn.errors import SettingsError

# Runs in a fresh interpreter: the device count is fixed when jax is first imported.
SHARDED_SCRIPT = textwrap.dedent(
    """
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxunlearn import parallel
    from jaxunlearn.models import ModelConfig, add_lora, from_config, join_lora, split_lora

    assert jax.device_count() == 8, jax.devices()
    config = ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, attention_bias=True,
    )
    model = add_lora(
        from_config(config, key=jax.random.key(0)), rank=4, alpha=8.0,
        targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        key=jax.random.key(1),
    )
    graphdef, lora, base = split_lora(model)
    lora = jax.tree.map(lambda x: x + 0.05 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), lora)
    ids = jax.random.randint(jax.random.key(2), (8, 12), 0, config.vocab_size)
    mask = jnp.ones((8, 12), jnp.int32).at[1, :5].set(0).at[6, 9:].set(0)

    def loss_and_logits(lora, base, ids, mask):
        logits = join_lora(graphdef, lora, base)(ids, mask)
        log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
        weights = (mask[:, :-1] * mask[:, 1:]).astype(jnp.float32)
        return -(picked * weights).sum() / weights.sum(), logits

    step = jax.value_and_grad(loss_and_logits, has_aux=True)
    (loss, logits), grads = jax.jit(step)(lora, base, ids, mask)

    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    lora_shardings = parallel.state_shardings(lora, mesh)
    base_shardings = parallel.state_shardings(base, mesh)
    batch = parallel.logical_sharding(("batch", None), mesh=mesh)
    replicated = NamedSharding(mesh, P())
    sharded_step = jax.jit(
        step,
        in_shardings=(lora_shardings, base_shardings, batch, batch),
        out_shardings=((replicated, batch), lora_shardings),
    )
    put = jax.device_put
    args = (put(lora, lora_shardings), put(base, base_shardings), put(ids, batch), put(mask, batch))
    (s_loss, s_logits), s_grads = sharded_step(*args)

    def relative(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    layer = args[1]["model"]["layers"][0]
    embed = args[1]["model"]["embed_tokens"].get_value()
    q_lora_b = s_grads["model"]["layers"][0]["self_attn"]["q_proj"]["lora_b"].get_value()
    report = {
        "loss_error": abs(float(s_loss) - float(loss)),
        "logits_max_abs_error": float(jnp.max(jnp.abs(s_logits - logits))),
        "grad_max_relative_error": max(
            relative(s, g) for s, g in zip(jax.tree.leaves(s_grads), jax.tree.leaves(grads))
        ),
        "specs": {
            "embed_tokens": str(embed.sharding.spec),
            "q_proj": str(layer["self_attn"]["q_proj"]["base"]["kernel"].get_value().sharding.spec),
            "down_proj": str(layer["mlp"]["down_proj"]["base"]["kernel"].get_value().sharding.spec),
            "lm_head": str(args[1]["lm_head"]["kernel"].get_value().sharding.spec),
            "grad_q_lora_b": str(q_lora_b.sharding.spec),
            "logits": str(s_logits.sharding.spec),
        },
        "embed_shard_shape": list(embed.addressable_shards[0].data.shape),
        "embed_devices": len({s.device for s in embed.addressable_shards}),
    }
    print(json.dumps(report))
    """
)


@pytest.mark.multi_device
def test_sharded_forward_and_lora_gradient_equal_single_device():
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=fake_devices_environment(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["loss_error"] <= 1e-6
    assert report["logits_max_abs_error"] <= 1e-5
    assert report["grad_max_relative_error"] <= 1e-5
    assert report["specs"] == {
        "embed_tokens": str(P("tensor", "fsdp")),
        "q_proj": str(P("fsdp", "tensor")),
        "down_proj": str(P("tensor", "fsdp")),
        "lm_head": str(P("fsdp", "tensor")),
        "grad_q_lora_b": str(P(None, "tensor")),
        "logits": str(P(("data", "fsdp"), None)),
    }
    # vocab 64 over tensor=2 and width 32 over fsdp=4: every device holds a distinct block.
    assert report["embed_shard_shape"] == [32, 8]
    assert report["embed_devices"] == 8


def test_rules_map_logical_names_and_respect_divisibility():
    mesh = parallel.make_mesh()
    assert parallel.logical_to_mesh(("embed", "mlp"), mesh=mesh) == P("fsdp", "tensor")
    assert parallel.logical_to_mesh(("batch", None), mesh=mesh) == P(("data", "fsdp"), None)
    # A mesh axis shards one dimension only.
    assert parallel.logical_to_mesh(("heads", "mlp"), mesh=mesh) == P("tensor", None)
    abstract = jax.sharding.AbstractMesh((2, 2, 2), parallel.MESH_AXES)
    assert parallel.logical_to_mesh(("vocab", "embed"), mesh=abstract, shape=(33, 8)) == P(
        None, "fsdp"
    )
    # 6 rows split over data × fsdp = 4 devices is uneven: keep data only.
    assert parallel.logical_to_mesh(("batch",), mesh=abstract, shape=(6,)) == P("data")
    assert parallel.logical_to_mesh(("batch",), mesh=abstract, shape=(8,)) == P(("data", "fsdp"))


def test_rule_errors_name_the_problem():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match="No sharding rule for logical axis 'experts'"):
        parallel.logical_to_mesh(("experts",), mesh=mesh)
    with pytest.raises(ValueError, match="not in the mesh"):
        parallel.logical_to_mesh(("embed",), mesh=mesh, rules=[("embed", "pipeline")])
    too_many = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"needs {too_many} devices"):
        parallel.make_mesh(fsdp=too_many)


def test_a_mesh_spec_names_its_axes_and_auto_takes_every_device():
    assert dict(parallel.mesh_from_spec("auto").shape) == {
        "data": 1,
        "fsdp": jax.device_count(),
        "tensor": 1,
    }
    assert dict(parallel.mesh_from_spec(" fsdp = 1 ").shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(SettingsError, match="AXIS=SIZE"):
        parallel.mesh_from_spec("fsdp:2")


def test_a_placement_splits_batches_on_its_mesh_and_leaves_them_alone_without_one():
    import numpy as np

    from jaxunlearn.batch import Batch

    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    batch = Batch(rows, np.ones_like(rows), np.ones((8, 3), np.float32), np.ones(8, bool))
    assert parallel.ONE_DEVICE.batch(batch) is batch
    assert parallel.ONE_DEVICE.batch_devices == 1
    assert parallel.ONE_DEVICE.row_sharding(8) is None
    assert parallel.ONE_DEVICE.describe() == "one device"
    # This process's one device as a mesh: the batch becomes device arrays on it, intact.
    placement = parallel.Placement(parallel.make_mesh())
    placed = placement.batch(batch)
    assert isinstance(placed.input_ids, jax.Array)
    assert placed.input_ids.sharding == placement.row_sharding(8).input_ids
    np.testing.assert_array_equal(np.asarray(placed.input_ids), rows)
    assert placement.describe() == "data=1 × fsdp=1 × tensor=1"


def test_a_placement_counts_the_batch_devices_and_refuses_what_they_cannot_split():
    from jax.sharding import AbstractMesh

    placement = parallel.Placement(AbstractMesh((2, 4, 2), parallel.MESH_AXES))
    assert placement.batch_devices == 8  # data × fsdp; tensor does not split the batch
    assert placement.round_batch_size(8) == 8
    assert placement.round_batch_size(9) == 16
    placement.check_batch_size(16)
    with pytest.raises(SettingsError, match=r"held batch 12 .* 8 batch devices .* multiple of 8"):
        placement.check_batch_size(12, what="held batch")
