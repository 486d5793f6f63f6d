"""How many CPU threads each rank uses: the node's cores shared among its ranks, unless the
config or the user's ``OMP_NUM_THREADS`` says otherwise (torchrun's default of 1 does not count)."""

import pytest

from omnilong.distributed import cpu_threads_per_rank


@pytest.mark.parametrize(
    "requested, environ, cores, expected",
    [
        # torchrun started 8 ranks on a 96-core node and set OMP_NUM_THREADS=1 itself
        (None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, 96, 12),
        # one process, nothing set: all the cores
        (None, {}, 16, 16),
        (None, {"LOCAL_WORLD_SIZE": "1"}, 16, 16),
        # more ranks than cores: at least one thread each
        (None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "4"}, 2, 1),
        # the user's own OMP_NUM_THREADS is kept
        (None, {"OMP_NUM_THREADS": "6", "LOCAL_WORLD_SIZE": "8"}, 96, 6),
        (None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "1"}, 96, 1),
        # the config wins over everything
        (3, {"OMP_NUM_THREADS": "6", "LOCAL_WORLD_SIZE": "8"}, 96, 3),
    ],
)
def test_threads_per_rank(requested, environ, cores, expected):
    threads, why = cpu_threads_per_rank(requested, environ, cores)
    assert threads == expected
    assert why  # the recipe logs the reason


def test_reason_names_the_source():
    assert (
        cpu_threads_per_rank(None, {"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "8"}, 96)[1]
        == "96 cores / 8 ranks on this node"
    )
    assert cpu_threads_per_rank(None, {"OMP_NUM_THREADS": "6"}, 96)[1] == "OMP_NUM_THREADS"
    assert cpu_threads_per_rank(4, {}, 96)[1] == "cpu_threads_per_rank"
