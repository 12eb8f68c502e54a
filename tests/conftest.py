"""Fixtures of every test: compiled programs are released before the process runs out of
memory mappings.

JAX keeps every compiled executable for as long as the process lives, and XLA's CPU backend
maps a few memory regions per executable. Thousands of compilations took the pytest process
past Linux's default limit of 65530 mappings (`vm.max_map_count`): LLVM then fails to allocate
("Cannot allocate memory") and the next compilation dies with a segmentation fault. After a
module that left the process above half the limit, JAX's caches are cleared.
"""

import jax
import pytest

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
