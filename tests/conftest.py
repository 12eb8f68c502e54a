"""Fixtures of every test: compiled programs are released before the process runs out of
memory mappings.

JAX keeps every compiled executable for as long as the process lives, and XLA's CPU backend
maps a few memory regions per executable. Thousands of compilations took the pytest process
past Linux's default limit of 65530 mappings (`vm.max_map_count`): LLVM then fails to allocate
("Cannot allocate memory") and the next compilation dies with a segmentation fault. After a
module that left the process above half the limit, JAX's caches are cleared.

Programs that take a while to compile are also kept in a persistent compilation cache for the
run, shared by the xdist workers and the subprocesses that tests start, so that a program
compiled again (by the other worker, after a clear, or in a subprocess) is read back instead.
"""

import os
import shutil
import tempfile

import jax
import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Smaller programs compile faster than they are written and read back.
_CACHED_COMPILE_SECONDS = 0.5


def pytest_configure(config):
    # The controller (or a run without xdist) makes the folder before the workers start, and
    # they inherit the variable; a cache folder the user set is used as it is.
    if not hasattr(config, "workerinput") and _CACHE_ENV not in os.environ:
        os.environ[_CACHE_ENV] = config._jaxunlearn_test_cache = tempfile.mkdtemp(
            prefix="jaxunlearn-tests-jax-cache-"
        )
    if _CACHE_ENV in os.environ:
        jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _CACHED_COMPILE_SECONDS)


def pytest_unconfigure(config):
    made = getattr(config, "_jaxunlearn_test_cache", None)
    if made:
        shutil.rmtree(made, ignore_errors=True)
        del os.environ[_CACHE_ENV]


_MAPPINGS = "/proc/self/maps"
_MAPPING_LIMIT = "/proc/sys/vm/max_map_count"


def _mappings_above_half_the_limit() -> bool:
    """Whether this process holds over half the kernel's limit of memory mappings (True where
    the counts cannot be read, so that caches are then cleared after every module)."""
    try:
        with open(_MAPPING_LIMIT) as file:
            limit = int(file.read())
        with open(_MAPPINGS, "rb") as file:
            mappings = sum(1 for _ in file)
    except (OSError, ValueError):
        return True
    return mappings > limit // 2


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    yield
    if _mappings_above_half_the_limit():
        jax.clear_caches()
