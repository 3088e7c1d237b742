"""The block pool behind the adapters' output caches (cynorm._blocks), on plain Python blocks."""
from cynorm._blocks import PAGE_BYTES, BlockPool, placement


class Block:
    """A block whose users are counted by hand: claimed by take, released by the test."""

    def __init__(self, nbytes):
        self.nbytes = nbytes
        self.users = 0


def claim(block):
    block.users += 1
    return block


def new_pool(limit):
    return BlockPool(limit, allocate=Block, is_free=lambda block: block.users == 0)


def test_a_block_is_reused_only_once_free():
    pool = new_pool(limit=100)
    first = pool.take(10, claim)
    second = pool.take(10, claim)
    assert second is not first and pool.blocks_of(10) == 2 and pool.free_bytes == 0
    first.users -= 1
    assert pool.take(10, claim) is first and pool.held_bytes == 20


def test_take_hands_its_arguments_to_claim():
    pool = new_pool(limit=100)
    block, label = pool.take(10, lambda block, label: (claim(block), label), "output")
    assert label == "output" and block.users == 1 and pool.blocks_of(10) == 1


def test_the_limit_drops_free_blocks_of_other_sizes_then_refuses():
    pool = new_pool(limit=30)
    small = pool.take(10, claim)
    pool.take(10, claim)
    small.users -= 1
    assert pool.take(20, claim) is not None   # the free 10-byte block made room
    assert pool.blocks_of(10) == 1 and pool.held_bytes == 30
    assert pool.take(20, claim) is None        # everything held is in use


def test_set_limit_lets_go_of_free_blocks_first_then_of_blocks_in_use():
    pool = new_pool(limit=100)
    in_use = pool.take(40, claim)
    free = pool.take(40, claim)
    free.users -= 1
    assert pool.set_limit(40) == 100
    assert pool.blocks_of(40) == 1 and pool.take(40, claim) is None   # the free block went first
    pool.set_limit(0)
    assert pool.held_bytes == 0 and in_use.users == 1   # forgotten, still its users'
    assert pool.take(40, claim) is None


def test_outputs_are_placed_on_a_line_half_a_page_from_their_input():
    for base in (0, 64, 4032, 12288 + 1984, 2 ** 40 + 128):   # blocks start on 64-byte lines
        for near in (0, 4, 16, 63, 64, 2047, 2048, 2064, 4095, 8192 + 80, 2 ** 40 + 2052):
            offset = placement(base, near)
            output = base + offset
            assert 0 <= offset < PAGE_BYTES and output % 64 == 0
            assert (output - (near - near % 64)) % PAGE_BYTES == PAGE_BYTES // 2
