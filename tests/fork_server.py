"""One fork server per test session (per xdist worker) that has imported torch, transformers,
OmniLong and the recipe: the processes a test starts from it (spawned ranks, one-process recipe
runs) begin in a fraction of a second instead of importing all of it anew (3-4 s each on the
2-core machine). The server runs no torch op, so no thread pool exists yet to be lost in a fork.
"""

import multiprocessing.context
import os

import torch.multiprocessing

# Every module here is imported once by the server; an import error is ignored by
# multiprocessing (the child then imports the module itself), so test_fork_server checks them.
PRELOAD = [
    "torch._dynamo",  # imported by DeviceMesh slicing in every run
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "transformers.models.auto.tokenization_auto",  # the recipe's tokenizer loading
    "omnilong.models.qwen2_5_vl.model",
    "omnilong.models.llava_onevision.model",
    "omnilong.parallel.context_parallel",
    "omnilong.parallel.fsdp",
    "omnilong.loss",
    "omnilong.cli",
    "omnilong_full",
    "tests.recipe_runs",
]


def fork_server_context() -> multiprocessing.context.ForkServerContext:
    """The multiprocessing context whose processes fork from the preloaded server."""
    context = torch.multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def adopt(environment: dict[str, str], cwd: str) -> None:
    """In a process forked from the server: take ``environment`` and ``cwd``, those of the test
    that starts it, as a spawned process would have; the server's own are those of whichever
    test happened to start the server."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
