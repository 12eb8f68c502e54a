"""LLMEraser's update against dense float64 linear algebra, and its contract as a `Method`.

References solve with the dense Hessian or Gauss-Newton matrix of the mean objective over the
whole training set (`unlearn_fixtures.DenseObjective`). The model's float32 intermediates
(RMSNorm, the LoRA path) bound the agreement at about 1e-6 relative; see test_curvature.py.
"""

import dataclasses
import json
import types
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from unlearn_fixtures import DenseObjective, random_examples, tiny_lora_model

from jaxunlearn import curvature, kernels
from jaxunlearn.data import Example, tokenize_examples
from jaxunlearn.errors import SettingsError
from jaxunlearn.unlearn import (
    MODES,
    SOLVERS,
    CGConfig,
    CurvatureSettings,
    EraserSettings,
    LissaConfig,
    LLMEraser,
    LowRankConfig,
    Method,
    PreparationMismatchError,
    Removal,
    ResponseEdit,
    SGDConfig,
    UnlearningContext,
    examples_digest,
    resolve_request,
    tree_digest,
)

RTOL = 1e-5
NUM_EXAMPLES = 9
FORGET = ["example-2", "example-5", "example-7"]


@pytest.fixture(autouse=True)
def float64():
    with jax.enable_x64(True):
        yield


def _exact(*, solver="cg", mode="influence", max_steps=400, **curvature_changes):
    """CG run to convergence with the whole training set as the curvature sample: the update is
    the exact solve. Keyword arguments other than these go to `CurvatureSettings`."""
    curv = {
        "kind": "gauss_newton",
        "damping": 0.05,
        "sample_size": NUM_EXAMPLES,
        "batch_size": 4,
        "leave_out_request": False,
        **curvature_changes,
    }
    return EraserSettings(
        solver=solver,
        mode=mode,
        max_steps=max_steps,
        cg=CGConfig(tol=1e-11),
        curvature=CurvatureSettings(**curv),
    )


def _context(model, examples, data, *, tokenizer=None, train_config=None):
    return UnlearningContext(
        model=model,
        examples=examples,
        data=data,
        tokenizer=tokenizer,
        adapter_digest=tree_digest(nnx.state(model, nnx.LoRAParam)),
        data_digest=examples_digest(examples),
        train_config=train_config,
    )


def _unlearn(model, examples, data, request, settings, *, tokenizer=None, warm_up=False):
    """Settles, prepares, (warms up) and applies, as `apply_request` does."""
    method = LLMEraser()
    context = _context(model, examples, data, tokenizer=tokenizer)
    settings, _ = method.settle(settings, context)
    prepared = method.prepare(context, settings)
    resolved = resolve_request(request, examples)
    if warm_up:
        method.warm_up(context, resolved, settings, prepared)
    return method.apply(context, resolved, settings, prepared), prepared


def _updated(model, lora):
    """A copy of `model` holding the adapter `lora`."""
    model = nnx.clone(model)
    nnx.update(model, lora)
    return model


def _lora_flat(model, dense):
    return dense.to_flat(curvature.split_for_curvature(model)[1])


def _snapshot(model):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.LoRAParam))]


def _assert_unchanged(model, snapshot):
    for before, after in zip(snapshot, _snapshot(model), strict=True):
        np.testing.assert_array_equal(before, after)


def _removal_reference(
    model, data, curvature_kind, damping, mode="influence", *, l2=0.0, leave_out=False
):
    """The update from dense matrices: the curvature over every example (or, with `leave_out`,
    over the retained ones), shifted by the penalty's μ and the damping λ."""
    dense = DenseObjective(model, data)
    forget = [data.index_of(i) for i in FORGET]
    retained = [i for i in range(len(data)) if i not in forget]
    curved = DenseObjective(model, data, retained) if leave_out else dense
    matrix = curved.hessian() if curvature_kind == "hessian" else curved.gauss_newton()
    forget_sum = len(forget) * DenseObjective(model, data, forget).gradient()
    n = len(data)
    system = matrix + (l2 + damping) * np.eye(matrix.shape[0])
    if mode == "influence":
        return dense, np.linalg.solve(system, forget_sum / n)
    full_sum = n * dense.gradient()
    after = (full_sum - forget_sum) / (n - len(forget)) + l2 * dense.flat
    return dense, -np.linalg.solve(system, after)


@pytest.mark.parametrize(
    ("curvature_kind", "mode", "budget"),
    [
        # The Hessian's products are checked against the dense Hessian in test_curvature.py,
        # and its solve path is the Gauss-Newton one: this case runs with -m slow.
        pytest.param("hessian", "influence", 4.0, marks=pytest.mark.slow),
        ("gauss_newton", "influence", 4.0),
        ("gauss_newton", "newton", 4.0),
        # No memory for linearizations: every product recomputes each batch's.
        ("gauss_newton", "influence", 0.0),
    ],
)
def test_removal_update_equals_the_dense_solve(curvature_kind, mode, budget):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    snapshot = _snapshot(model)
    # The Hessian here is indefinite; the damping keeps H + λI positive definite.
    damping = 1.0 if curvature_kind == "hessian" else 0.05
    dense, reference = _removal_reference(model, data, curvature_kind, damping, mode)
    before = _lora_flat(model, dense)
    settings = _exact(
        mode=mode, kind=curvature_kind, damping=damping, linearization_budget_gib=budget
    )
    outcome, _ = _unlearn(
        model, examples, data, Removal(FORGET), settings, warm_up=mode == "newton"
    )
    assert outcome.figures["solver_status"] == "CONVERGED"
    assert outcome.converged is True
    assert outcome.approximate is False
    update = dense.to_flat(outcome.lora) - before
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())
    # The reported ‖ΔΘ‖ is that of Θ_new − Θ̂ up to the rounding of one addition.
    assert outcome.figures["update_norm"] == pytest.approx(np.linalg.norm(update), rel=1e-9)
    assert outcome.figures["update_norm"] == pytest.approx(np.linalg.norm(reference), rel=RTOL)
    # The outcome carries the new adapter; the model it was computed from is untouched.
    _assert_unchanged(model, snapshot)
    unlearned = _updated(model, outcome.lora)
    np.testing.assert_allclose(_lora_flat(unlearned, dense) - before, update, rtol=1e-9, atol=1e-15)
    json.dumps(dict(outcome.figures), allow_nan=False)
    assert outcome.figures["solver"] == "cg"
    assert outcome.figures["mode"] == mode


@pytest.mark.parametrize(
    ("mode", "l2", "damping", "leave_out"),
    [
        ("newton", 0.3, 0.0, False),
        ("influence", 0.3, 0.02, True),
        # Each ingredient is covered above; this combination only adds time.
        pytest.param("newton", 0.3, 0.0, True, marks=pytest.mark.slow),
    ],
)
def test_penalty_and_left_out_curvature_match_the_dense_solve(mode, l2, damping, leave_out):
    """μ joins the curvature and the Newton gradient; leave_out_request drops the request's
    examples from the curvature."""
    model = tiny_lora_model(seed=2, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES, seed=2)
    dense, reference = _removal_reference(
        model, data, "gauss_newton", damping, mode, l2=l2, leave_out=leave_out
    )
    before = _lora_flat(model, dense)
    settings = _exact(mode=mode, damping=damping, l2_regularization=l2, leave_out_request=leave_out)
    outcome, _ = _unlearn(model, examples, data, Removal(FORGET), settings)
    assert outcome.figures["solver_status"] == "CONVERGED"
    assert outcome.figures["left_out_examples"] == (len(FORGET) if leave_out else 0)
    update = dense.to_flat(outcome.lora) - before
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())
    # Each ingredient changes the answer by far more than the tolerance.
    _, without = _removal_reference(model, data, "gauss_newton", damping + l2, mode)
    assert np.abs(without - reference).max() > 100 * RTOL * np.abs(reference).max()


def test_removal_raises_the_forget_loss():
    """The sign: the update undoes the removed examples' pull, so their loss goes up."""
    model = tiny_lora_model(seed=1, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES, seed=1)
    forget = [data.index_of(i) for i in FORGET]
    dense_forget = DenseObjective(model, data, forget)
    before = float(dense_forget.loss(dense_forget.flat))
    outcome, _ = _unlearn(model, examples, data, Removal(FORGET), _exact(damping=0.5))
    unlearned = _updated(model, outcome.lora)
    after = float(
        DenseObjective(unlearned, data, forget).loss(DenseObjective(unlearned, data).flat)
    )
    assert after > before


def test_response_edit_subtracts_the_edited_gradient(tiny_tokenizer_data):
    model, examples, data, tokenizer = tiny_tokenizer_data
    edited_id = examples[1].id
    new_response = " a corrected answer"
    dense = DenseObjective(model, data)
    matrix = dense.gauss_newton() + 0.05 * np.eye(dense.flat.size)
    original_gradient = DenseObjective(model, data, [1]).gradient()
    edited = [dataclasses.replace(examples[1], response=new_response)]
    edited_data = tokenize_examples(
        edited, tokenizer, max_length=data.max_length, buckets=data.buckets
    )
    edited_gradient = DenseObjective(model, edited_data).gradient()
    reference = np.linalg.solve(matrix, (original_gradient - edited_gradient) / len(data))
    outcome, _ = _unlearn(
        model,
        examples,
        data,
        ResponseEdit({edited_id: new_response}),
        _exact(sample_size=len(data)),
        tokenizer=tokenizer,
    )
    update = dense.to_flat(outcome.lora) - dense.flat
    np.testing.assert_allclose(update, reference, rtol=0, atol=RTOL * np.abs(reference).max())


@pytest.mark.parametrize("solver", ["lowrank", "lissa", "sgd"])
def test_other_solvers_approach_the_exact_update(solver):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    damping = 0.05
    dense, reference = _removal_reference(model, data, "gauss_newton", damping)
    dimension = dense.flat.size
    settings = dataclasses.replace(
        # lissa/sgd: mini-batches of the whole set.
        _exact(solver=solver, damping=damping, batch_size=NUM_EXAMPLES, max_steps=3000),
        # lowrank: a full Krylov basis is exact.
        lowrank=LowRankConfig(rank=dimension),
        sgd=SGDConfig(learning_rate=0.5),
    )
    outcome, _ = _unlearn(model, examples, data, Removal(FORGET), settings)
    update = dense.to_flat(outcome.lora) - dense.flat
    error = np.linalg.norm(update - reference) / np.linalg.norm(reference)
    tolerance = {"lowrank": 1e-4, "lissa": 1e-3, "sgd": 1e-4}[solver]
    assert error <= tolerance
    # Approximate by construction; only cg reports reaching a tolerance.
    assert outcome.approximate is True
    assert outcome.converged is (None if solver == "lowrank" else False)
    json.dumps(dict(outcome.figures), allow_nan=False)


def test_a_preparation_is_reused_and_survives_a_save(tmp_path):
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()
    context = _context(model, examples, data)
    settings = dataclasses.replace(
        _exact(solver="lowrank", mode="newton", damping=None, relative_damping=0.1),
        lowrank=LowRankConfig(rank=20),
    )
    settings, _ = method.settle(settings, context)
    prepared = method.prepare(context, settings)
    spectrum = prepared.value.spectrum
    assert prepared.value.damping == pytest.approx(
        0.1 * spectrum.largest + max(0.0, -spectrum.smallest)
    )
    method.save_preparation(prepared, tmp_path / "prep")
    loaded = method.load_preparation(tmp_path / "prep", context)
    loaded.check(method.name, context, method.preparation_key(settings))
    assert loaded.value.damping == prepared.value.damping
    assert loaded.value.spectrum == spectrum
    assert loaded.adapter_digest == prepared.adapter_digest
    np.testing.assert_array_equal(loaded.value.sample_indices, prepared.value.sample_indices)

    resolved = resolve_request(Removal(FORGET), examples)
    first = method.apply(context, resolved, settings, prepared)
    second = method.apply(context, resolved, settings, loaded)
    for a, b in zip(jax.tree.leaves(first.lora), jax.tree.leaves(second.lora), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-12)

    other_examples, other_data = random_examples(NUM_EXAMPLES + 1, seed=3)
    other_context = _context(model, other_examples, other_data)
    with pytest.raises(PreparationMismatchError, match="other training data"):
        method.apply(
            other_context, resolve_request(Removal(FORGET), other_examples), settings, loaded
        )


def test_a_preparation_made_at_another_adapter_is_refused():
    """After one request the adapter has moved: its full-data gradient and curvature are
    stale, so reusing the preparation would give a wrong Newton step."""
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()
    settings = _exact(mode="newton", max_steps=50)
    outcome, prepared = _unlearn(model, examples, data, Removal(FORGET[:1]), settings)
    moved = _updated(model, outcome.lora)
    context = _context(moved, examples, data)
    resolved = resolve_request(Removal(FORGET[1:]), examples)
    for call in (method.warm_up, method.apply):
        with pytest.raises(PreparationMismatchError, match="made at adapter"):
            call(context, resolved, settings, prepared)


def test_a_preparation_with_other_settings_is_refused():
    """Settings the preparation fixed are never silently replaced by the preparation's."""
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()
    context = _context(model, examples, data)
    settings = _exact(sample_size=6)
    prepared = method.prepare(context, settings)
    resolved = resolve_request(Removal(FORGET), examples)
    for changed, name in [
        (_exact(sample_size=7), "sample_size"),
        (_exact(sample_size=6, damping=0.1), "damping"),
        (_exact(sample_size=6, mode="newton"), "full_gradient"),
        (dataclasses.replace(_exact(sample_size=6), seed=1), "seed"),
    ]:
        with pytest.raises(PreparationMismatchError, match=name):
            method.apply(context, resolved, changed, prepared)
    # What the preparation does not depend on may change between requests.
    method.apply(context, resolved, dataclasses.replace(settings, max_steps=3), prepared)
    with pytest.raises(ValueError, match="preparation"):
        method.apply(context, resolved, settings, None)


def test_a_preparation_without_a_spectrum_survives_a_save(tmp_path):
    """cg with a given damping estimates no spectrum: NaN in memory, null on disk."""
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()
    context = _context(model, examples, data)
    settings, _ = method.settle(_exact(sample_size=6), context)
    prepared = method.prepare(context, settings)
    assert np.isnan(prepared.value.spectrum.largest)
    method.save_preparation(prepared, tmp_path / "prep")
    loaded = method.load_preparation(tmp_path / "prep", context)
    loaded.check(method.name, context, method.preparation_key(settings))
    assert np.isnan(loaded.value.spectrum.largest)
    assert loaded.value.full_gradient is None
    assert loaded.value.eigenpairs is None
    with pytest.raises(FileExistsError):
        method.save_preparation(prepared, tmp_path / "prep")


def test_cg_stopped_at_max_steps_is_approximate():
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    outcome, _ = _unlearn(model, examples, data, Removal(FORGET), _exact(max_steps=2))
    assert outcome.approximate is True
    assert outcome.converged is False
    assert outcome.figures["solver_status"] == "MAX_STEPS"
    assert outcome.figures["solver_steps"] == 2
    assert outcome.residual is not None
    assert outcome.residual > 1e-11


def test_a_failed_solve_raises_and_leaves_the_adapter_unchanged():
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    snapshot = _snapshot(model)
    # The Hessian is indefinite here (test_curvature.py): tiny damping lets CG meet negative
    # curvature.
    with pytest.raises(kernels.SolverError, match="INDEFINITE"):
        _unlearn(model, examples, data, Removal(FORGET), _exact(kind="hessian", damping=1e-6))
    _assert_unchanged(model, snapshot)


# One refusal runs by default: both solvers go through the same check.
@pytest.mark.parametrize("solver", [pytest.param("lissa", marks=pytest.mark.slow), "sgd"])
def test_an_indefinite_curvature_is_refused_by_solvers_that_cannot_handle_it(solver):
    """With (almost) no damping and no penalty, the indefinite Hessian would make LiSSA and
    the stochastic solver return garbage: refused before the solve, saying what to change."""
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    with pytest.raises(SettingsError, match="damping 0 needs"):
        _exact(solver=solver, kind="hessian", damping=0.0, l2_regularization=0.0)
    settings = _exact(solver=solver, kind="hessian", damping=1e-6, l2_regularization=0.0)
    with pytest.raises(kernels.SolverError, match=r"indefinite.*Gauss-Newton"):
        LLMEraser().prepare(_context(model, examples, data), settings)


def test_settings_are_checked():
    for settings, message in [
        (lambda: EraserSettings(solver="newton-schulz"), "solver"),
        (lambda: EraserSettings(mode="exact"), "mode"),
        (lambda: EraserSettings(max_steps=0), "max_steps"),
        (lambda: EraserSettings(seed=-1), "seed"),
        (lambda: EraserSettings(curvature={"kind": "hessian"}), "CurvatureSettings"),
        (lambda: CurvatureSettings(kind="fisher"), "curvature"),
        (lambda: CurvatureSettings(damping=-1.0), "damping"),
        (lambda: CurvatureSettings(damping=float("nan")), "damping"),
        (lambda: CurvatureSettings(l2_regularization=-1e-3), "l2_regularization"),
        (lambda: CurvatureSettings(damping=0.0, l2_regularization=0.0), "damping 0 needs"),
        (lambda: CurvatureSettings(sample_size=2.5), "sample_size"),
        (lambda: CurvatureSettings(batch_size=True), "batch_size"),
        (lambda: CurvatureSettings(leave_out_request="yes"), "leave_out_request"),
        (lambda: CurvatureSettings(linearization_budget_gib=-1.0), "linearization_budget"),
        (lambda: CurvatureSettings(linearization_budget_gib=None), "linearization_budget"),
        (lambda: CGConfig(tol=0.0), "tol"),
        (lambda: LissaConfig(scale_margin=0.5), "scale_margin"),
        (lambda: SGDConfig(learning_rate=-1.0), "learning_rate"),
        (lambda: SGDConfig(selection_checks=0), "selection_checks"),
        (lambda: LowRankConfig(rank=0), "rank"),
        (lambda: EraserSettings(solver="lowrank"), "leave_out_request needs"),
    ]:
        with pytest.raises(SettingsError, match=message):
            settings()
    assert CurvatureSettings(damping=0.0, l2_regularization=1e-2).damping == 0.0
    lowrank = EraserSettings(solver="lowrank", curvature=CurvatureSettings(leave_out_request=False))
    assert lowrank.strategy is SOLVERS["lowrank"]


def test_the_defaults_are_the_measured_recipe():
    settings = EraserSettings()
    assert (settings.solver, settings.mode, settings.max_steps, settings.seed) == (
        "cg",
        "newton",
        7,
        0,
    )
    assert settings.curvature == CurvatureSettings(
        kind="gauss_newton",
        damping=None,
        l2_regularization=None,
        sample_size=96,
        batch_size=8,
        leave_out_request=True,
    )
    assert isinstance(LLMEraser(), Method)
    assert set(typing.get_args(typing.get_type_hints(EraserSettings)["solver"])) == set(SOLVERS)
    assert set(typing.get_args(typing.get_type_hints(EraserSettings)["mode"])) == set(MODES)


def _leaves(settings_type):
    """(flag, field, owner) of every leaf field of a settings tree."""
    hints = typing.get_type_hints(settings_type)
    for field in dataclasses.fields(settings_type):
        kind = hints[field.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaves(kind)
        else:
            yield field.metadata.get("flag", field.name), field, settings_type, kind


def test_every_leaf_setting_is_one_documented_flag_of_a_plain_type():
    leaves = list(_leaves(EraserSettings))
    flags = [flag for flag, *_ in leaves]
    assert len(flags) == len(set(flags)), flags
    assert "curvature" in flags
    assert "kind" not in flags
    for flag, field, owner, kind in leaves:
        attributes = owner.__doc__.split("Attributes:", 1)[1]
        assert f"\n        {field.name}: " in attributes, (owner.__name__, field.name)
        plain = kind
        if isinstance(plain, types.UnionType):
            (plain,) = [arg for arg in typing.get_args(plain) if arg is not type(None)]
        if typing.get_origin(plain) is typing.Literal:
            plain = type(typing.get_args(plain)[0])
        assert plain in (int, float, bool, str), (flag, kind)


def test_settle_reads_the_adapters_penalty():
    model = tiny_lora_model(seed=0)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()

    def settle(settings, train_config):
        return method.settle(settings, _context(model, examples, data, train_config=train_config))

    penalized, notes = settle(EraserSettings(), {"l2_regularization": 1e-2})
    assert penalized.curvature.l2_regularization == 1e-2
    assert penalized.curvature.damping == 0.0
    assert notes == []
    assert settle(penalized, {"l2_regularization": 1e-2})[0] == penalized

    plain, notes = settle(EraserSettings(), {"l2_regularization": 0.0})
    assert plain.curvature.l2_regularization == 0.0
    assert plain.curvature.damping is None
    assert len(notes) == 1
    assert "penalized objective" in notes[0]
    assert "0.64" in notes[0]
    _, notes = settle(EraserSettings(), None)
    assert "unknown" in notes[0]

    explicit = EraserSettings(curvature=CurvatureSettings(l2_regularization=0.0, damping=0.1))
    settled, notes = settle(explicit, {"l2_regularization": 1e-2})
    assert settled.curvature.l2_regularization == 0.0
    assert "differs" in notes[0]

    with pytest.raises(SettingsError, match="damping 0 needs an L2 penalty"):
        settle(EraserSettings(curvature=CurvatureSettings(damping=0.0)), {})


def test_an_edit_needs_the_tokenizer():
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    method = LLMEraser()
    context = _context(model, examples, data)
    settings = _exact(sample_size=6)
    prepared = method.prepare(context, settings)
    resolved = resolve_request(ResponseEdit({"example-1": " new"}), examples)
    with pytest.raises(ValueError, match="tokenizer"):
        method.apply(context, resolved, settings, prepared)


def test_data_must_match_the_examples():
    model = tiny_lora_model(seed=0, dtype=jnp.float64)
    examples, data = random_examples(NUM_EXAMPLES)
    shuffled = [examples[1], examples[0], *examples[2:]]
    with pytest.raises(ValueError, match="same order"):
        LLMEraser().prepare(_context(model, shuffled, data), _exact())


@pytest.fixture(scope="module")
def tiny_tokenizer_data(tmp_path_factory):
    """A tiny model with a real BPE tokenizer, for edits (their new text must be tokenized)."""
    from unlearn_fixtures import CONFIG

    from jaxunlearn.data import train_bpe_tokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    texts = [f"Question {i}: what is {i} plus {i}? The answer is {2 * i}." for i in range(40)]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, out_dir=directory)
    examples = [
        Example(f"qa-{i}", f"Question {i}: what is {i} plus {i}?", f" The answer is {2 * i}.")
        for i in range(6)
    ]
    with jax.enable_x64(True):
        config = dataclasses.replace(CONFIG, vocab_size=len(tokenizer))
        model = _tiny_model_with(config)
    data = tokenize_examples(examples, tokenizer, max_length=48, buckets=(16, 32, 48))
    return model, examples, data, tokenizer


def _tiny_model_with(config):
    from jaxunlearn.models import add_lora, from_config

    model = add_lora(
        from_config(config, key=jax.random.key(0), dtype=jnp.float64),
        rank=1,
        alpha=4.0,
        targets=("q_proj", "v_proj"),
        key=jax.random.key(1),
    )
    lora = nnx.state(model, nnx.LoRAParam)
    leaves, structure = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    nnx.update(
        model,
        jax.tree.unflatten(
            structure,
            [
                0.5 * jax.random.normal(k, leaf.shape, jnp.float64)
                for k, leaf in zip(keys, leaves, strict=True)
            ],
        ),
    )
    return model
