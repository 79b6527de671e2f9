"""Counter-based random streams for the data layers: the draws of record *k* are a function of
(seed, stream, k), so a resumed run seeks to record *k* without replaying the draws before it.

``RecordDraws(seed, stream).block(k, n)``: the random words of records ``k .. k+n-1``, one row
of four uint64 per record: Philox-4x64 (Salmon et al. 2011, NumPy's ``Philox``) at counter
``(k, 0, stream, 0)`` under the 128-bit key derived from ``seed``. One call gives a whole batch.
``uniform_int(word, m)`` maps a word to ``[0, m)`` (``floor(word · m / 2^64)``; its bias is below
m / 2^64). ``permutation(seed, stream, epoch, n)``: the shuffle of pass ``epoch`` (NumPy's
permutation under ``SeedSequence([seed, stream, epoch])``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["RecordDraws", "uniform_int", "permutation", "coin"]

_MASK64 = (1 << 64) - 1


class RecordDraws:
    """The random words of each record of one stream (see the module docstring)."""

    def __init__(self, seed: int, stream: int):
        key = np.random.SeedSequence([int(seed) & _MASK64, int(stream)]).generate_state(2, np.uint64)
        self.stream = int(stream)
        self._bits = np.random.Philox(key=key)

    def block(self, k: int, n: int = 1) -> np.ndarray:
        """Four uint64 words per record for records ``k .. k+n-1`` (an ``(n, 4)`` array)."""
        if n <= 0:
            return np.zeros((0, 4), np.uint64)
        state = self._bits.state
        # NumPy's Philox adds one to its 256-bit counter before each block: start one below
        # (k, 0, stream, 0), borrowing across words
        c = ((self.stream << 128) | (int(k) & _MASK64)) - 1
        state["state"]["counter"] = np.array([(c >> (64 * i)) & _MASK64 for i in range(4)], dtype=np.uint64)
        state["buffer_pos"] = 4
        state["has_uint32"] = 0
        self._bits.state = state
        return self._bits.random_raw(4 * n).reshape(n, 4)


def uniform_int(word, m: int) -> int:
    """An integer in ``[0, m)`` from one uint64 ``word``."""
    return (int(word) * int(m)) >> 64


def coin(word) -> bool:
    """A fair coin from one uint64 ``word`` (its top bit)."""
    return bool(int(word) >> 63)


def permutation(seed: int, stream: int, epoch: int, n: int) -> np.ndarray:
    """The order of ``n`` items in pass ``epoch`` of a shuffled stream."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & _MASK64, int(stream), int(epoch)]))
    return rng.permutation(n)
