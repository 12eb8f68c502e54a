"""`timed`: the warm-up runs first and counts as compilation; the run's arrays are waited for."""

import jax
import jax.numpy as jnp

from jaxunlearn.eval import Timed, timed


def test_the_warm_up_runs_first_and_is_timed_apart():
    calls = []
    square = jax.jit(lambda x: x @ x)
    x = jnp.ones((64, 64))

    def warm_up():
        calls.append("warm_up")
        return square(x)

    def run():
        calls.append("run")
        return {"product": square(x)}

    measured = timed(run, warm_up=warm_up)
    assert isinstance(measured, Timed)
    assert calls == ["warm_up", "run"]
    assert measured.value["product"].is_ready()
    assert float(measured.value["product"][0, 0]) == 64.0
    assert measured.seconds >= 0
    assert measured.compile_seconds > 0


def test_without_a_warm_up_nothing_counts_as_compilation():
    measured = timed(lambda: "not an array")
    assert measured.value == "not an array"
    assert measured.compile_seconds == 0.0
    assert measured.seconds >= 0
