"""`jaxunlearn plan`: the programs of a configuration compiled on abstract arrays for a mesh."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from tiny_assets import TINY_CONFIG

from jaxunlearn import parallel
from jaxunlearn.cli import PLAN_PROGRAMS
from jaxunlearn.errors import SettingsError
from jaxunlearn.models import ModelConfig, architecture_config, shipped_config_names
from jaxunlearn.plan import PROGRAMS, PlanSettings, cpu_planning_flags

TESTS = os.path.dirname(os.path.abspath(__file__))
BATCH, LENGTH, RANK = 4, 64, 4
# Every head count divisible by tensor=2, so each attention block splits over it.
CONFIG = dataclasses.replace(
    TINY_CONFIG, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2
)


COMMAND = "import sys; from jaxunlearn.cli import main; sys.exit(main())"


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """The command in a fresh interpreter (it sets up its own fake devices), CPU only."""
    environment = dict(os.environ, JAX_PLATFORMS="cpu")
    environment.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-c", COMMAND, *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def tiny_config_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-config")
    CONFIG.to_hf().save_pretrained(directory)
    return directory


def tiny_plan(config_dir, mesh: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(
        "plan",
        "--model",
        str(config_dir),
        "--mesh",
        mesh,
        "--batch",
        str(BATCH),
        "--length",
        str(LENGTH),
        "--rank",
        str(RANK),
        "--targets",
        "q_proj,v_proj,down_proj",
        "--dtype",
        "float32",
        *extra,
    )


def per_device_parameter_bytes(mesh_shape: dict[str, int]) -> float:
    """The bytes of the tiny model's base and LoRA trees one device holds under the default
    rules, from each parameter's logical axes (float32, every shard of equal size)."""
    import jax
    from flax import nnx

    from jaxunlearn import curvature
    from jaxunlearn.models import add_lora, from_config

    def build():
        model = from_config(CONFIG, key=jax.random.key(0))
        return add_lora(
            model,
            rank=RANK,
            alpha=float(RANK),
            targets=("q_proj", "v_proj", "down_proj"),
            key=jax.random.key(1),
        )

    _, lora, base = curvature.split_for_curvature(nnx.eval_shape(build))
    mesh = AbstractMesh(tuple(mesh_shape.values()), tuple(mesh_shape))
    total = 0.0
    for state in (lora, base):
        for variable in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
            value = variable.get_value()
            axes = variable.get_metadata().get("logical_axes")
            spec = (
                () if axes is None else parallel.logical_to_mesh(axes, mesh=mesh, shape=value.shape)
            )
            split = math.prod(
                mesh_shape[axis] for entry in spec if entry for axis in np.atleast_1d(entry)
            )
            total += value.size * value.dtype.itemsize / split
    return total


@pytest.fixture(scope="module")
def mesh_plan(tiny_config_dir):
    result = tiny_plan(tiny_config_dir, "fsdp=4,tensor=2", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.multi_device
def test_plan_on_a_mesh_compiles_every_program_with_the_parameters_sharded(mesh_plan):
    assert [p["name"] for p in mesh_plan["programs"]] == list(PROGRAMS)
    assert mesh_plan["mesh"] == "data=1 × fsdp=4 × tensor=2"
    assert mesh_plan["platform"] == "cpu"
    assert mesh_plan["fits"]
    by_name = {p["name"]: p for p in mesh_plan["programs"]}
    for program in by_name.values():
        assert program["peak_bytes"] == (
            program["argument_bytes"]
            + program["output_bytes"]
            - program["alias_bytes"]
            + program["temp_bytes"]
        )
        assert program["flops"] > 0
        assert program["temp_bytes"] > 0
    # The gradient's arguments on one device are its share of the base and LoRA trees as the
    # rules split them, and its share of the batch (4 rows over fsdp=4: one row of 64 tokens,
    # three int32/bool token arrays and one row flag): the compiler saw sharded inputs.
    batch_bytes = LENGTH * (4 + 4 + 1) + 1
    expected = per_device_parameter_bytes({"data": 1, "fsdp": 4, "tensor": 2}) + batch_bytes
    assert by_name["gradient"]["argument_bytes"] == pytest.approx(expected, rel=0.01)
    # Rows split over fsdp make every program sum its gradient over devices.
    for name in ("gradient", "hessian_product", "gauss_newton_product", "train_step"):
        collectives = by_name[name]["collectives"]
        assert collectives["all-reduce"] + collectives["reduce-scatter"] > 0, name
    # Activations keep their rows on their devices (FSDP): the weights are gathered, and no
    # layer re-lays its activations out. Without the row constraint the same gradient holds 12
    # all-to-alls (one per attention and MLP block and their transposes) and twice the
    # all-reduces.
    for name in ("gradient", "hessian_product", "gauss_newton_product"):
        assert by_name[name]["collectives"]["all-to-all"] <= 1, name
    # A Hessian-vector product is forward-over-reverse: about twice a gradient's work.
    ratio = by_name["hessian_product"]["flops"] / by_name["gradient"]["flops"]
    assert 1.5 < ratio < 3.5
    # The CG step is one Gauss-Newton product plus vector updates.
    assert by_name["cg_step"]["flops"] >= by_name["gauss_newton_product"]["flops"]


def test_plan_on_one_device_has_no_collectives_and_says_when_it_does_not_fit(
    tiny_config_dir, mesh_plan
):
    fits = tiny_plan(tiny_config_dir, "fsdp=1", "--json", "--programs", "gradient")
    assert fits.returncode == 0, fits.stderr[-3000:]
    single = json.loads(fits.stdout)
    (gradient,) = single["programs"]
    assert not any(gradient["collectives"].values())
    sharded = {p["name"]: p for p in mesh_plan["programs"]}["gradient"]
    assert gradient["argument_bytes"] > 3 * sharded["argument_bytes"]

    tight = gradient["peak_bytes"] / 2**30 / 2
    refused = tiny_plan(
        tiny_config_dir, "fsdp=1", "--programs", "gradient", "--device-memory", str(tight)
    )
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert "does not fit: gradient need" in refused.stdout
    assert "| gradient |" in refused.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--model", "Llama-9-1B"), "neither a shipped architecture"),
        (("--mesh", "fsdp=3"), "cannot be split over the mesh's 3 batch devices"),
        (("--mesh", "fsdp=0"), "must be a positive integer"),
        (("--programs", "gradient,backprop"), "plan programs must be among"),
        (("--targets", "q_proj,wq"), "LoRA targets must be"),
        (("--batch", "0"), "batch_size must be a positive integer"),
        (("--device-memory", "0"), "--device-memory must be > 0 GiB"),
    ],
)
def test_plan_refuses_bad_input_in_one_line(tiny_config_dir, arguments, message):
    base = {"--model": str(tiny_config_dir), "--mesh": "fsdp=1", "--length": "64"}
    base.update(dict(zip(arguments[::2], arguments[1::2], strict=True)))
    result = run_cli("plan", *(item for pair in base.items() for item in pair))
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def test_shipped_architectures_have_their_published_parameter_counts():
    # Counts as their publishers state them (the sum of every tensor of the checkpoint).
    published = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320}
    published["Llama-3-8B"] = 8_030_261_248
    for name, count in published.items():
        config = architecture_config(name)
        assert isinstance(config, ModelConfig)
        assert config.num_parameters == count, name
    assert architecture_config("llama-3-8b").num_kv_heads == 8
    opt = architecture_config("OPT-13B")
    assert (opt.num_layers, opt.hidden_size, opt.vocab_size) == (40, 5120, 50272)
    assert set(shipped_config_names()) == {"Llama-2-7B", "Llama-2-13B", "Llama-3-8B", "OPT-13B"}


def test_a_config_is_read_from_a_folder_or_its_config_json(tiny_config_dir):
    assert architecture_config(tiny_config_dir) == CONFIG
    assert architecture_config(tiny_config_dir / "config.json") == CONFIG
    with pytest.raises(SettingsError, match="neither a shipped"):
        architecture_config(tiny_config_dir / "missing")


def test_plan_settings_and_flags_are_checked():
    with pytest.raises(SettingsError, match="batch_size"):
        PlanSettings(batch_size=0)
    with pytest.raises(SettingsError, match="dtype"):
        PlanSettings(dtype="float16")
    flags = cpu_planning_flags(8, "--xla_force_host_platform_device_count=2 --xla_dump_to=x")
    assert flags.split() == [
        "--xla_dump_to=x",
        "--xla_force_host_platform_device_count=8",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    ]
    assert PLAN_PROGRAMS == PROGRAMS
    assert parallel.mesh_sizes("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2}
    with pytest.raises(SettingsError, match="no sizes"):
        parallel.mesh_sizes("auto")


SEQUENTIAL_TEMPORARIES = """
import jax, jax.numpy as jnp
def f(x):
    total = 0.0
    for i in range(8):
        y = jnp.sin(x * i)
        total = total + jnp.sum(jnp.cos(y) @ y[:4].T)
    return total
x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
print(jax.jit(f).lower(x).compile().memory_analysis().temp_size_in_bytes)
"""


def test_the_planning_flags_make_cpu_memory_a_peak_not_a_sum():
    # Eight 4 MiB temporaries, each dead before the next: a peak holds about one of them.
    one = 1024 * 1024 * 4
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=cpu_planning_flags(1))
    result = subprocess.run(
        [sys.executable, "-c", SEQUENTIAL_TEMPORARIES],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.strip()) < 3 * one
