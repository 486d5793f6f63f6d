"""A ring of virtual ranks in one process: ring attention's code, with the point-to-point
exchange replaced by a local stand-in.

Each virtual rank runs in its own thread and calls the same ``ring_forward`` /
``ring_backward`` as a real cp rank; :class:`LocalRing` hands the tensors over in memory
(copied, as a real transfer would). This is how ring attention is checked on a machine
with one GPU, or none.
"""

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


class _Mailbox:
    """Messages between the virtual ranks, keyed by (receiver, sequence number)."""

    def __init__(self) -> None:
        self.messages: dict[tuple[int, int], list] = {}
        self.arrived = threading.Condition()

    def post(self, receiver: int, seq: int, tensors: list) -> None:
        with self.arrived:
            self.messages[(receiver, seq)] = tensors
            self.arrived.notify_all()

    def take(self, receiver: int, seq: int, timeout: float) -> list:
        with self.arrived:
            if not self.arrived.wait_for(lambda: (receiver, seq) in self.messages, timeout):
                raise TimeoutError(f"virtual rank {receiver} waited {timeout} s for message {seq}")
            return self.messages.pop((receiver, seq))


class _LocalTransfer:
    def __init__(self, mailbox: _Mailbox, rank: int, seq: int, timeout: float):
        self.mailbox, self.rank, self.seq, self.timeout = mailbox, rank, seq, timeout

    def wait(self) -> list[torch.Tensor | None]:
        return self.mailbox.take(self.rank, self.seq, self.timeout)


class LocalRing:
    """Virtual rank ``rank`` of ``size``: the same ``shift`` as a process-group ring.

    The ``n``-th ``shift`` of a rank is received by the ``n``-th ``wait`` on its next rank,
    as with matched point-to-point operations.
    """

    def __init__(self, mailbox: _Mailbox, rank: int, size: int, timeout: float):
        self.mailbox, self.rank, self.size, self.timeout = mailbox, rank, size, timeout
        self.sent = 0

    def shift(self, tensors: Sequence[torch.Tensor | None]) -> _LocalTransfer:
        copies = [None if t is None else t.clone() for t in tensors]
        self.mailbox.post((self.rank + 1) % self.size, self.sent, copies)
        transfer = _LocalTransfer(self.mailbox, self.rank, self.sent, self.timeout)
        self.sent += 1
        return transfer


def run_local_ring(size: int, fn: Callable[[LocalRing], T], timeout: float = 120.0) -> list[T]:
    """Run ``fn(ring)`` for every virtual rank of a ring of ``size``, each in a thread.

    Returns:
        ``fn``'s results in rank order.

    Raises:
        RuntimeError: a rank failed (its exception is chained).
    """
    mailbox = _Mailbox()
    results: list = [None] * size
    errors: list[BaseException | None] = [None] * size

    def run(rank: int) -> None:
        try:
            results[rank] = fn(LocalRing(mailbox, rank, size, timeout))
        except BaseException as error:  # reported to the caller below
            errors[rank] = error

    threads = [threading.Thread(target=run, args=(rank,), daemon=True) for rank in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for rank, error in enumerate(errors):
        if error is not None:
            raise RuntimeError(f"virtual rank {rank} of {size} failed: {error}") from error
    return results
