"""Blocks of memory for large outputs and buffers, reused once nothing holds them any more.

A fresh output of tens of MB is paid for on its first writes, a page fault per page, and its pages cannot take
streaming stores; inference and training loops ask for the same sizes call after call.  Each user keeps a
:class:`BlockPool` of blocks in its own terms (torch storages for the PyTorch adapter, NumPy arrays for the Keras
adapter and the NumPy API's float16 buffers, see :func:`numpy_block_pool`) and tells it how to make a block and
how to see that only the pool still references one.
"""
import sys
import threading

# Large outputs start half a page away from their input in the address bits below the page size.  On x86-64 a
# load waits on an earlier store whose address agrees with its own in those 12 bits (4K aliasing), and the
# kernels load the input a little ahead of the output they store: outputs 16-64 bytes past their input's place
# in a page ran channels-last GroupNorm (8,56,56,256) forwards and backwards 1.1-1.2x slower, and a layer norm
# (4096,768) backward 1.1-1.4x, than outputs half a page away (Zen 3, one process).  A torch tensor starts 64 bytes
# into a page, a NumPy array 16, so an adapter's output fell a line or less past an input from the other library.
PAGE_BYTES = 4096
_LINE_BYTES = 64


def placement(base, near):
    """How many bytes past ``base`` (an address on a 64-byte line) an output for an input at address ``near``
    starts: on a line, half a page from ``near``'s line in the page.  Less than PAGE_BYTES, which a block holds
    more than the outputs it serves."""
    return (near - near % _LINE_BYTES + PAGE_BYTES // 2 - base) % PAGE_BYTES


def placed_in(memory, like):
    """The part of ``memory`` (uint8, at least ``like.nbytes + PAGE_BYTES`` of them) where an output like the array
    ``like`` starts, as :func:`placement` places it: its ``like.nbytes`` bytes."""
    offset = placement(memory.ctypes.data, like.ctypes.data)
    return memory[offset:offset + like.nbytes]


class BlockPool:
    """Blocks by size in bytes, each free or in use, up to ``limit`` bytes in all.

    ``allocate(nbytes)`` makes a block; ``is_free(block)`` tells whether nothing but the pool references it.
    A block is in use as long as something holds what :meth:`take` made of it.
    """

    def __init__(self, limit, allocate, is_free):
        self.limit = limit
        self._allocate = allocate
        self._is_free = is_free
        self._blocks = {}   # size in bytes -> the blocks of that size
        self._bytes = 0     # held in all
        self._lock = threading.Lock()

    def take(self, nbytes, claim, *args):
        """``claim(block, *args)`` on a free block of ``nbytes``, or on a new one if the limit leaves room (after
        dropping free blocks of other sizes); None if it does not.  ``claim`` must return something that
        references the block, which marks it in use: it runs under the pool's lock, so that no other caller takes
        the same block meanwhile.  (Arguments rather than a closure: the adapters call this on every large output,
        from caches a kernel has just swept.)"""
        with self._lock:
            blocks = self._blocks.get(nbytes)
            if blocks is None:
                blocks = self._blocks[nbytes] = []
            for block in blocks:
                if self._is_free(block):
                    return claim(block, *args)
            self._drop(self._bytes + nbytes - self.limit, only_free=True)
            if self._bytes + nbytes > self.limit:
                return None
            block = self._allocate(nbytes)
            blocks.append(block)
            self._bytes += nbytes
            return claim(block, *args)

    def _drop(self, nbytes, only_free):
        """Lets go of at least ``nbytes`` of blocks if there are enough: free ones only, or any (a block in use
        stays alive for its users and is freed after them, outside the pool)."""
        for size, blocks in self._blocks.items():
            kept = []
            for block in blocks:
                if nbytes > 0 and (not only_free or self._is_free(block)):
                    self._bytes -= size
                    nbytes -= size
                else:
                    kept.append(block)
            blocks[:] = kept

    def set_limit(self, limit):
        """Sets the limit, letting go of free blocks and then of blocks in use beyond it; returns the previous one."""
        with self._lock:
            previous, self.limit = self.limit, limit
            self._drop(self._bytes - limit, only_free=True)
            self._drop(self._bytes - limit, only_free=False)
            return previous

    @property
    def free_bytes(self):
        with self._lock:
            return sum(size for size, blocks in self._blocks.items() for block in blocks if self._is_free(block))

    def blocks_of(self, nbytes):
        """How many blocks of ``nbytes`` the pool holds."""
        return len(self._blocks.get(nbytes, ()))

    @property
    def held_bytes(self):
        return self._bytes


def numpy_block_pool(limit, allocate):
    """A :class:`BlockPool` of NumPy blocks: ``allocate(nbytes)`` returns a view of memory that nothing else
    references (the view's ``base``).  Arrays made from a block keep a reference to that memory (NumPy views of
    views refer to the array owning it), so a block is free when it alone refers to its memory."""
    # (counted on a new block, the way the pool counts: the block is its memory's only referrer)
    free_references = _memory_references(allocate(1))
    return BlockPool(limit, allocate=allocate, is_free=lambda block: _memory_references(block) == free_references)


def _memory_references(block):
    return sys.getrefcount(block.base)
