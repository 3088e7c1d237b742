"""Thread-count API, and results that do not depend on the thread count or on the batch around a sample."""
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import cynorm

from _core_util import (FLOAT_DTYPES, GROUP_BLOCK_CASES, NARROW_COLUMN_CASES, SPLIT_CASES, WIDE_COLUMN_CASES, NormCase,
                        assert_bitwise_equal, dtype_name, random_array, random_params, run_forward_and_backward)

# Each norm and layout with 100k to 200k elements: enough work that a kernel which keeps small inputs on one
# thread still gives every one of 3 threads a share.
THREADED_CASES = (
    NormCase("group", (4, 32, 32, 32), 1, 8),
    NormCase("group", (4, 32, 32, 32), -1, 8),
    NormCase("group", (2, 8, 96, 96), 2, 4),
    NormCase("instance", (2, 16, 64, 64), 1),
    NormCase("instance", (2, 64, 64, 16), -1),
    NormCase("layer", (512, 300), -1),
    NormCase("layer", (16, 80, 100), (-2, -1)),
    NormCase("layer", (16, 26, 26, 20), 1),
    NormCase("rms", (512, 300), -1),
    NormCase("rms", (16, 26, 26, 20), 1),
    NormCase("layer", (6001, 20), -1),  # short rows, 16 at a time, and a partial block
    NormCase("rms", (3001, 50), -1),
    NormCase("group", (3001, 32, 1), 1, 8),
    # channels-last samples of over 1 MiB, two or more per thread: odd threads run a sample ahead
    NormCase("group", (6, 64, 64, 72), -1, 8),
    # one channels-last sample of a single tile: normalized in a part per thread (rows folded in the second)
    NormCase("group", (1, 8, 16, 512), -1, 32),
    NormCase("group", (1, 200, 10), -1, 5),
) + SPLIT_CASES + NARROW_COLUMN_CASES + WIDE_COLUMN_CASES + GROUP_BLOCK_CASES


@pytest.fixture
def restore_thread_setting():
    """Whatever a test sets, the setting (including "follow OpenMP's default") is restored afterwards."""
    with cynorm.num_threads(cynorm.get_num_threads()):
        yield


def _num_threads_in_subprocess(**environment):
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    env.update(environment)
    result = subprocess.run([sys.executable, "-c", "import cynorm; print(cynorm.get_num_threads())"],
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    return int(result.stdout)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # (fork in a process with threads, Python 3.12+)
def test_a_forked_child_runs_the_kernels_on_one_thread(restore_thread_setting):
    """GNU OpenMP does not survive fork: once the parent had run the kernels on two threads, a forked child's
    first call on two waited forever.  The child runs them on one thread, with the same results, and takes a
    count it sets itself."""
    x = random_array((8, 64, 16, 16), "float32", seed=0)
    cynorm.set_num_threads(2)
    expected = cynorm.group_norm(x, 8)
    child = os.fork()
    if child == 0:   # (only the exit status leaves the child)
        status = 1
        try:
            if cynorm.get_num_threads() == 1 and (cynorm.group_norm(x, 8) == expected).all():
                cynorm.set_num_threads(3)
                status = 0 if cynorm.get_num_threads() == 3 else 1
        finally:
            os._exit(status)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        finished, status = os.waitpid(child, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    pytest.fail("the forked child's kernel call did not return")

@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
def test_default_is_every_usable_core():
    assert _num_threads_in_subprocess() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("count", [1, 3])
def test_omp_num_threads_is_honoured(count):
    assert _num_threads_in_subprocess(OMP_NUM_THREADS=str(count)) == count


@pytest.mark.parametrize("count", [1, 2, 3])
def test_set_num_threads(restore_thread_setting, count):
    cynorm.set_num_threads(count)
    assert cynorm.get_num_threads() == count


def test_negative_counts_back_from_the_maximum(restore_thread_setting):
    maximum = cynorm.get_num_threads()
    cynorm.set_num_threads(-1)
    assert cynorm.get_num_threads() == maximum
    cynorm.set_num_threads(-maximum)
    assert cynorm.get_num_threads() == 1


def test_zero_threads_is_an_error(restore_thread_setting):
    with pytest.raises(ValueError, match=r"\b0\b"):
        cynorm.set_num_threads(0)
    with pytest.raises(ValueError, match=r"\b0\b"):
        with cynorm.num_threads(0):
            pass


@pytest.mark.parametrize("count", [1.5, "2"])
def test_non_integer_thread_count_is_an_error(restore_thread_setting, count):
    with pytest.raises(TypeError, match=str(count).replace(".", r"\.")):
        cynorm.set_num_threads(count)


def test_context_manager_restores_the_count_even_after_an_error():
    before = cynorm.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with cynorm.num_threads(other):
            assert cynorm.get_num_threads() == other
            raise RuntimeError
    assert cynorm.get_num_threads() == before


def test_threadpoolctl_limit_applies():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = cynorm.get_num_threads()
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cynorm.get_num_threads() == 1
    assert cynorm.get_num_threads() == before


# ---------------------------------------------------------------------------------------------------------------
# Bitwise reproducibility: the reduction order is fixed, not left to the schedule or the batch size.

def _inputs(case, dtype, seed=0):
    x = random_array(case.shape, dtype, seed=seed, loc=0.5, scale=2.0)
    dy = random_array(case.shape, dtype, seed=seed + 1)
    weight, bias = random_params(case, dtype, seed=seed + 2)
    return x, weight, bias, dy


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", THREADED_CASES, ids=str)
def test_results_do_not_depend_on_the_thread_count(case, dtype, threads):
    inputs = _inputs(case, dtype)
    with cynorm.num_threads(1):
        serial = run_forward_and_backward(case, *inputs)
    with cynorm.num_threads(threads):
        parallel = run_forward_and_backward(case, *inputs)
    assert serial.keys() == parallel.keys()
    for name in serial:
        assert_bitwise_equal(parallel[name], serial[name], err_msg=name)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
@pytest.mark.parametrize("case", THREADED_CASES, ids=str)
def test_a_sample_alone_equals_the_same_sample_in_a_batch(case, dtype):
    """Forward outputs, statistics and dx of one sample do not depend on the other samples in the batch."""
    batch = case.with_shape((3,) + case.shape[1:])
    x, weight, bias, dy = _inputs(batch, dtype)
    in_batch = run_forward_and_backward(batch, x, weight, bias, dy)
    sample = slice(1, 2)
    alone = run_forward_and_backward(batch.with_shape((1,) + case.shape[1:]), x[sample], weight, bias, dy[sample])
    for name in ("y", "dx", "rstd") + (("mean",) if case.has_bias else ()):
        assert_bitwise_equal(alone[name], in_batch[name][sample], err_msg=name)


def test_concurrent_calls_from_python_threads():
    """The kernels release the GIL: calls from several Python threads at once (a server's pool) run side by
    side, each with its own scratch memory, and give the bits of the same calls made one at a time."""
    cases = [case for case in THREADED_CASES[:10] for _ in range(2)]
    inputs = [_inputs(case, "float32", seed=seed) for seed, case in enumerate(cases)]
    one_at_a_time = [run_forward_and_backward(case, *case_inputs) for case, case_inputs in zip(cases, inputs)]
    with ThreadPoolExecutor(4) as pool:
        side_by_side = list(pool.map(lambda case, case_inputs: run_forward_and_backward(case, *case_inputs),
                                     cases * 3, inputs * 3))
    for index, results in enumerate(side_by_side):
        expected = one_at_a_time[index % len(cases)]
        for name in expected:
            assert_bitwise_equal(results[name], expected[name], err_msg=f"{cases[index % len(cases)]} {name}")
