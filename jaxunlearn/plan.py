"""Whether a configuration fits its devices, answered by the compiler before any weight exists.

`plan` builds the model, its LoRA adapters and a batch as abstract arrays (shapes, dtypes and
mesh shardings; nothing is allocated), then lowers and compiles, for that mesh, the programs
that fine-tuning and unlearning run: the training step, the gradient of the objective, the
Hessian-vector and Gauss-Newton products (linearized afresh per product, as for a model too
large to keep a linearization), and one conjugate-gradient step on the default curvature. For
each it reads XLA's memory analysis (per device: arguments, outputs, temporaries) and cost
analysis (FLOPs per device), counts the collectives in the compiled program, and compares the
peak with the device's memory.

Without accelerators it compiles for fake CPU devices (`cpu_planning_flags`). XLA:CPU computes
bfloat16 matrix products in float32 and keeps float32 copies of the operands, so its figures
for a bfloat16 model are upper bounds of a GPU's; the report says which backend compiled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxunlearn import curvature, kernels, parallel, train
from jaxunlearn.batch import Batch
from jaxunlearn.errors import SettingsError
from jaxunlearn.models import VOCAB_CHUNK, add_lora, from_config

__all__ = [
    "PROGRAMS",
    "Plan",
    "PlanSettings",
    "ProgramPlan",
    "cpu_planning_flags",
    "plan",
    "planning_devices",
]

GiB = 2**30

# The programs `plan` compiles, in the order it reports them.
PROGRAMS = ("train_step", "gradient", "hessian_product", "gauss_newton_product", "cg_step")

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

# An instruction of compiled HLO text: `%name = f32[...] all-gather(...)` or its async start.
_COLLECTIVE = re.compile(r"= [^=]*? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")

# The device memory a verdict is measured against when the device does not report its own: an
# 80 GB accelerator (A100/H100 80GB report 79.x GiB usable; 80 GiB is what they are sold as).
DEFAULT_DEVICE_MEMORY_GIB = 80.0


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """What is planned for.

    Attributes:
        batch_size: Rows of one batch (of the training step and of every curvature product).
        length: Tokens per row.
        rank: LoRA rank.
        targets: The projections with adapters.
        dtype: The base model's dtype (`bfloat16` or `float32`); LoRA is float32 always.
        remat: Rematerialize each decoder layer in the backward passes.
        damping: λ of the CG step (a value; it does not change the program).
        vocab_chunk: The width of the loss's vocabulary chunks (`None`: whole logits).
    """

    batch_size: int = 4
    length: int = 2048
    rank: int = 64
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    dtype: str = "bfloat16"
    remat: bool = True
    damping: float = 1e-3
    vocab_chunk: int | None = VOCAB_CHUNK

    def __post_init__(self):
        for name in ("batch_size", "length", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SettingsError(f"plan {name} must be a positive integer, got {value!r}.")
        if self.dtype not in ("bfloat16", "float32"):
            raise SettingsError(f"plan dtype must be bfloat16 or float32, got {self.dtype!r}.")
        if not self.targets:
            raise SettingsError("plan needs at least one LoRA target.")
        chunk = self.vocab_chunk
        if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
            raise SettingsError(
                f"plan vocab_chunk must be a positive width or None, got {chunk!r}."
            )


class ProgramPlan(NamedTuple):
    """One compiled program's needs, per device.

    Attributes:
        name: One of `PROGRAMS`.
        argument_bytes: Its inputs (the base weights' share, the adapter, the batch).
        output_bytes: Its outputs.
        alias_bytes: Outputs written into donated inputs (counted once).
        temp_bytes: Temporaries at the compiler's peak.
        flops: Floating-point operations per device (XLA's cost analysis).
        collectives: How many of each collective the program holds (a count of instructions,
            not of executions: one inside a loop counts once).
        compile_seconds: Lowering and compiling it took this long.
    """

    name: str
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    flops: float
    collectives: dict[str, int]
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """What the device must hold at once: arguments, outputs and temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


class Plan(NamedTuple):
    """The programs of one configuration compiled for one mesh.

    Attributes:
        model: The architecture's name (or path), as asked.
        parameters: The base model's parameter count.
        lora_parameters: The adapter's parameter count.
        settings: What was planned for.
        mesh: The mesh, as "data=1 × fsdp=8 × tensor=1".
        platform: The backend that compiled (`gpu`, `tpu`, or `cpu` for fake devices).
        device_memory_bytes: The memory of one device the verdict is measured against.
        programs: One `ProgramPlan` per program of `PROGRAMS`.
    """

    model: str
    parameters: int
    lora_parameters: int
    settings: PlanSettings
    mesh: str
    platform: str
    device_memory_bytes: int
    programs: tuple[ProgramPlan, ...]

    @property
    def peak_bytes(self) -> int:
        """The largest per-device peak over the programs."""
        return max(program.peak_bytes for program in self.programs)

    @property
    def fits(self) -> bool:
        """Whether every program's peak fits one device's memory."""
        return self.peak_bytes <= self.device_memory_bytes

    def program(self, name: str, /) -> ProgramPlan:
        """The plan of the program called `name`."""
        for program in self.programs:
            if program.name == name:
                return program
        raise KeyError(name)

    def verdict(self) -> str:
        """One sentence: fits or not, with the peak, the program that sets it and the memory."""
        worst = max(self.programs, key=lambda program: program.peak_bytes)
        peak, memory = worst.peak_bytes / GiB, self.device_memory_bytes / GiB
        if self.fits:
            return (
                f"fits: the peak is {peak:.1f} GiB per device ({worst.name}) of {memory:.1f} GiB."
            )
        over = [p.name for p in self.programs if p.peak_bytes > self.device_memory_bytes]
        return (
            f"does not fit: {', '.join(over)} need more than the {memory:.1f} GiB of a device "
            f"(peak {peak:.1f} GiB per device, {worst.name})."
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (sizes in bytes, and GiB for reading)."""
        return {
            "model": self.model,
            "parameters": self.parameters,
            "lora_parameters": self.lora_parameters,
            "settings": {
                **dataclasses.asdict(self.settings),
                "targets": list(self.settings.targets),
            },
            "mesh": self.mesh,
            "platform": self.platform,
            "device_memory_bytes": self.device_memory_bytes,
            "peak_bytes": self.peak_bytes,
            "fits": self.fits,
            "verdict": self.verdict(),
            "programs": [
                {
                    "name": p.name,
                    "argument_bytes": p.argument_bytes,
                    "output_bytes": p.output_bytes,
                    "alias_bytes": p.alias_bytes,
                    "temp_bytes": p.temp_bytes,
                    "peak_bytes": p.peak_bytes,
                    "peak_gib": round(p.peak_bytes / GiB, 3),
                    "flops": p.flops,
                    "collectives": p.collectives,
                    "compile_seconds": round(p.compile_seconds, 2),
                }
                for p in self.programs
            ],
        }

    def table(self) -> str:
        """The programs as a Markdown table, per device, followed by the verdict."""
        chunk = self.settings.vocab_chunk
        vocabulary = "whole" if chunk is None else f"in chunks of {chunk}"
        rows = [
            f"{self.model}: {self.parameters / 1e9:.2f}B parameters, LoRA r={self.settings.rank} "
            f"on {', '.join(self.settings.targets)} ({self.lora_parameters / 1e6:.1f}M), "
            f"{self.settings.dtype}, batch {self.settings.batch_size} × {self.settings.length} "
            f"tokens, remat {'on' if self.settings.remat else 'off'}, vocabulary {vocabulary}; "
            f"mesh {self.mesh}, compiled for {self.platform}.",
            "",
            "| program | arguments GiB | outputs GiB | temporaries GiB | peak GiB | TFLOPs | "
            "collectives |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for p in self.programs:
            collectives = ", ".join(f"{name} {n}" for name, n in p.collectives.items() if n)
            rows.append(
                f"| {p.name} | {p.argument_bytes / GiB:.2f} | {p.output_bytes / GiB:.2f} | "
                f"{p.temp_bytes / GiB:.2f} | {p.peak_bytes / GiB:.2f} | {p.flops / 1e12:.2f} | "
                f"{collectives or 'none'} |"
            )
        rows += ["", self.verdict()]
        if self.platform == "cpu" and self.settings.dtype == "bfloat16":
            rows.append(
                "Compiled for CPU devices: XLA:CPU computes bfloat16 products in float32, so "
                "figures of a bfloat16 model are upper bounds of an accelerator's."
            )
        return "\n".join(rows)


def cpu_planning_flags(num_devices: int, /, flags: str = "") -> str:
    """`XLA_FLAGS` for planning on `num_devices` fake CPU devices, added to `flags`.

    XLA:CPU's default scheduler runs independent operations concurrently and so keeps their
    buffers apart: its memory analysis is then the sum of every temporary, not a peak. The
    sequential scheduler reuses buffers as an accelerator's does. Both flags must be set
    before JAX starts its CPU backend.
    """
    extra = [
        f"--xla_force_host_platform_device_count={num_devices}",
        "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    ]
    kept = [f for f in flags.split() if not f.startswith(tuple(e.split("=")[0] for e in extra))]
    return " ".join([*kept, *extra])


def planning_devices(num_devices: int, /) -> list[jax.Device]:
    """The devices to compile for: the accelerators when there are enough, else CPU devices.

    Raises:
        SettingsError: If neither has `num_devices` devices (fake CPU devices must be asked
            for before JAX starts: `XLA_FLAGS=cpu_planning_flags(n)`, as the command does).
    """
    accelerators = [d for d in jax.devices() if d.platform != "cpu"]
    if len(accelerators) >= num_devices:
        return accelerators[:num_devices]
    cpus = jax.devices("cpu")
    if len(cpus) >= num_devices:
        return cpus[:num_devices]
    raise SettingsError(
        f"Planning for {num_devices} devices needs {num_devices} devices to compile for; "
        f"{len(accelerators)} accelerators and {len(cpus)} CPU devices are visible. Set "
        f"XLA_FLAGS='{cpu_planning_flags(num_devices)}' before JAX starts (the jaxunlearn "
        "plan command does)."
    )


def plan(
    config: Any,
    mesh: Mesh,
    /,
    *,
    settings: PlanSettings = PlanSettings(),
    name: str = "model",
    device_memory_bytes: int | None = None,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    programs: Sequence[str] = PROGRAMS,
    progress: Callable[[str], None] | None = None,
) -> Plan:
    """Compiles the programs of `settings` for `config` on `mesh`, on abstract arrays only.

    Args:
        config: The architecture (`ModelConfig`, `GPT2Config` or `OPTConfig`).
        mesh: The devices to compile for (`planning_devices`, `parallel.make_mesh`).
        settings: Batch, length, LoRA and dtype.
        name: How the report names the model.
        device_memory_bytes: The memory of one device; default: what the device reports, or
            80 GiB.
        rules: The logical-axis rules that shard the parameters.
        programs: Which of `PROGRAMS` to compile.
        progress: Called with each program's name before it compiles.

    Raises:
        SettingsError: For settings the model or the mesh cannot take (a batch the mesh's
            batch axes do not divide, a LoRA target the model lacks, a length beyond the
            model's positions).
    """
    unknown = [p for p in programs if p not in PROGRAMS]
    if unknown or not programs:
        raise SettingsError(f"plan programs must be among {PROGRAMS}, got {list(programs)}.")
    placement = parallel.Placement(mesh, rules)
    placement.check_batch_size(settings.batch_size, what="plan batch size (--batch)")
    limit = getattr(config, "context_limit", None)
    if limit is not None and settings.length > limit:
        raise SettingsError(
            f"--length {settings.length} exceeds the {limit} positions of this model."
        )
    dtype = jnp.dtype(settings.dtype)

    def build():
        model = from_config(config, key=jax.random.key(0), dtype=dtype, remat=settings.remat)
        add_lora(
            model,
            rank=settings.rank,
            alpha=float(settings.rank),
            targets=settings.targets,
            key=jax.random.key(0),
        )
        model.vocab_chunk = settings.vocab_chunk
        return model

    abstract_model = nnx.eval_shape(build)
    graphdef, lora, base = curvature.split_for_curvature(abstract_model)
    lora, base = _abstract(lora, mesh, rules), _abstract(base, mesh, rules)
    batch = _abstract_batch(settings, mesh, rules)
    compilers = {
        "train_step": lambda: _train_step(abstract_model, settings, mesh, rules),
        "gradient": lambda: curvature._summed_gradient.lower(lora, base, batch, graphdef=graphdef),
        "hessian_product": lambda: curvature.batch_product(graphdef, "hessian").lower(
            lora, base, batch, lora
        ),
        "gauss_newton_product": lambda: curvature.batch_product(graphdef, "gauss_newton").lower(
            lora, base, batch, lora
        ),
        "cg_step": lambda: _cg_step(graphdef, lora, base, batch, settings.damping, mesh),
    }
    planned = []
    for program in PROGRAMS:
        if program not in programs:
            continue
        if progress is not None:
            progress(program)
        started = time.perf_counter()
        # Traced as finetune and apply_request trace them: activations' rows on their devices.
        with parallel.activations_on(placement):
            compiled = compilers[program]().compile()
        planned.append(_measured(program, compiled, time.perf_counter() - started))
    device = mesh.devices.flat[0]
    return Plan(
        model=name,
        parameters=_count(base),
        lora_parameters=_count(lora),
        settings=settings,
        mesh=placement.describe(),
        platform=device.platform,
        device_memory_bytes=int(device_memory_bytes or _device_memory(device)),
        programs=tuple(planned),
    )


def _abstract(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """`state` as `ShapeDtypeStruct`s carrying the shardings of its logical axes."""
    return _placed(state, parallel.state_shardings(state, mesh, rules=rules))


def _placed(tree, shardings):
    """The abstract values of `tree` (arrays or shape structs) with `shardings` (a tree)."""
    return jax.tree.map(
        lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
        tree,
        shardings,
    )


def _abstract_batch(settings: PlanSettings, mesh: Mesh, rules, *, stacked: bool = False) -> Batch:
    lead = (1,) if stacked else ()
    rows, tokens = (*lead, settings.batch_size), (*lead, settings.batch_size, settings.length)
    shardings = parallel.batch_shardings(settings.batch_size, mesh, rules=rules, stacked=stacked)
    shapes = Batch(input_ids=tokens, attention_mask=tokens, loss_mask=tokens, example_mask=rows)
    dtypes = Batch(jnp.int32, jnp.int32, jnp.bool_, jnp.bool_)
    return Batch(
        *(
            jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for shape, dtype, sharding in zip(shapes, dtypes, shardings, strict=True)
        )
    )


def _train_step(model: nnx.Module, settings: PlanSettings, mesh: Mesh, rules):
    """The training step `finetune` compiles on a mesh (one micro-batch, AdamW), lowered."""
    view = nnx.view(model, deterministic=False, raise_if_not_found=False)
    graphdef, params, frozen = nnx.split(view, nnx.LoRAParam, ...)
    optimizer_settings = train._OptimizerSettings.from_config(
        train.TrainConfig(batch_size=settings.batch_size)
    )
    placement = train._Placement.of(
        params, frozen, optimizer_settings, settings.batch_size, mesh, rules
    )
    opt_state = jax.eval_shape(train._optimizer(optimizer_settings).init, params)
    opt_state = _placed(opt_state, placement.opt_state)
    replicated = parallel.replicated(mesh)
    return placement.train_step(graphdef, optimizer_settings).lower(
        _abstract(params, mesh, rules),
        opt_state,
        _abstract(frozen, mesh, rules),
        _abstract_batch(settings, mesh, rules, stacked=True),
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
    )


def _cg_step(graphdef, lora, base, batch, damping: float, mesh: Mesh):
    """One CG step on the default curvature (Gauss-Newton), its state donated, lowered."""
    product = curvature.batch_product(graphdef, "gauss_newton")
    operator = jax.tree_util.Partial(product, lora, base, batch)
    state = jax.eval_shape(kernels.cg_solver(operator, damping=damping).init, lora)
    # The state's trees keep the adapter's shardings; its scalars are replicated.
    shardings = kernels.CGState(
        *(
            _shardings_of(lora) if isinstance(field, nnx.State) else parallel.replicated(mesh)
            for field in state
        )
    )
    state = _placed(state, shardings)
    return _jitted_cg_step(damping).lower(operator, state)


@functools.cache
def _jitted_cg_step(damping: float):
    def step(operator, state):
        return kernels.cg_solver(operator, damping=damping).step(state)

    return jax.jit(step, donate_argnums=1)


def _shardings_of(tree):
    return jax.tree.map(lambda leaf: leaf.sharding, tree)


def _measured(name: str, compiled, seconds: float) -> ProgramPlan:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    # One dict per program in older JAX releases, a list of one in some.
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _COLLECTIVE.finditer(compiled.as_text()):
        counts[match.group(1)] += 1
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    return ProgramPlan(
        name=name,
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        flops=flops if math.isfinite(flops) else 0.0,
        collectives=counts,
        compile_seconds=seconds,
    )


def _count(state: nnx.State) -> int:
    """The number of floating-point parameters (random-stream counters are not counted)."""
    leaves = jax.tree.leaves(state)
    return sum(math.prod(leaf.shape) for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.floating))


def _device_memory(device: jax.Device) -> int:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # CPU devices raise or return None: they report no limit.
        stats = {}
    limit = stats.get("bytes_limit")
    return int(limit) if limit else int(DEFAULT_DEVICE_MEMORY_GIB * GiB)
