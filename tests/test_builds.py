"""Every compiled build of the kernels (baseline, x86-64-v3, x86-64-v4) gives the same bits, and the float16
conversions agree with NumPy's casts."""
import atexit
import functools
import importlib
import importlib.util
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from cynorm import _kernels
from cynorm._kernels_baseline import cpu_level

BUILDS = _kernels.available_builds()
# The x86-64-v4 build compiled for this CPU with its AVX-512 intrinsics emulated (tests/avx512_emulation.h), where
# the CPU cannot run the real one: its code is otherwise never run on such a machine (CI's, for one).
EMULATED_AVX512 = "x86_64_v4_emulated"
_SOURCE_TREE = pathlib.Path(__file__).resolve().parents[1]
if ("x86_64_v4" not in BUILDS and platform.machine().lower() in ("x86_64", "amd64") and sys.platform == "linux"
        and (_SOURCE_TREE / "setup.py").exists()):
    BUILDS = BUILDS + [EMULATED_AVX512]


@functools.lru_cache(maxsize=None)
def _emulated_avx512_build():
    """Builds it once (about 30 s) into a temporary directory, with the flags of setup.py; returns the loaded
    module, or None where the compiler cannot compile the kernels' AVX-512 code."""
    build = tempfile.mkdtemp(prefix="cynorm-emulated-avx512-")
    atexit.register(shutil.rmtree, build, ignore_errors=True)
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", os.path.join(build, "lib"),
                             "--build-temp", os.path.join(build, "temp")],
                            cwd=_SOURCE_TREE, env=dict(os.environ, CYNORM_EMULATE_AVX512="1"), capture_output=True,
                            text=True)
    if "needs GCC 12 or later" in result.stdout + result.stderr:
        return None
    assert result.returncode == 0, f"the emulated AVX-512 build failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    library, = pathlib.Path(build, "lib", "cynorm").glob("_kernels_x86_64_v4.*")
    spec = importlib.util.spec_from_file_location("_kernels_x86_64_v4", library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _module(name):
    if name == EMULATED_AVX512:
        module = _emulated_avx512_build()
        if module is None:
            pytest.skip("the C compiler does not compile the kernels' AVX-512 code (GCC 12 or later, or clang)")
        return module
    return importlib.import_module(f"cynorm._kernels_{name}")


_GUARD = 0xA5


def _run_all_kernels(module, dtype, stream, output_phase=0, guards=None):
    """Forward and backward of fifteen rows cases and two columns cases, and a columns forward in blocks, with
    adversarial data, as raw kernel calls; `stream`: the forward and the backward write their outputs with
    streaming stores and prefetch their input (the kernels' paths for arrays that outgrow the cache);
    `output_phase`: where the outputs y and dx start in a cache line (kernels stream lines straight where the
    output starts one, the lines at either end of a thread's values with ordinary stores).  Each output lies
    between two lines of _GUARD bytes; with a list `guards`, (memory, start, end) of each goes into it."""
    def output_like(x):
        memory = np.full(x.nbytes + 192, _GUARD, np.uint8)
        start = -memory.ctypes.data % 64 + 64 + output_phase
        if guards is not None:
            guards.append((memory, start, start + x.nbytes))
        out = memory[start:start + x.nbytes].view(x.dtype)
        out[...] = 0
        return out

    rng = np.random.default_rng(7)
    results = []
    rows, length = 5, 8195   # a partial chunk and a lane tail; the backward's long rows
    x = (1e4 + rng.standard_normal(rows * length)).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    weight = rng.standard_normal(length).astype(dtype)
    bias = rng.standard_normal(length).astype(dtype)
    y, mean, rstd = output_like(x), np.empty(rows), np.empty(rows)
    at = module.address_of   # the kernels take their arrays by address
    float64 = dtype == np.float64
    module.forward_rows(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, rows, 1, length, 1, 1e-5,
                        True, stream, stream, 2)
    dx, dweight, dbias = output_like(x), np.empty_like(weight), np.empty_like(weight)
    module.backward_rows(at(dy), at(x), at(mean), at(rstd), at(weight), at(dx), at(dweight), at(dbias), float64,
                         rows, 1, length, 1, True, stream, stream, 2)
    results += [y, mean, rstd, dx, dweight, dbias]

    # Rows that AVX-512 and AVX2 builds take four at a time: rows of 48 (the backward's, 32 lanes and 16 more), of
    # 80 and of 256 values (both passes'), centered, and rows of 96 in 2 groups, not centered (RMS norm); rows left
    # over.  Among the rows of 256, two whose first 32 values are far from the rest (the forward's centre is
    # refused) and one whose float squares overflow: those the four-row kernel leaves to the row path.  And
    # rows of 16, whose backward AVX-512 builds take sixteen at a time, centered and not, in 1 and 2 groups (each
    # of the backward's 4 blocks of samples has a full sixteen and some left).  Rows of 528 values, centered and
    # not, whose backward writes dx and adds the parameter terms in one loop a row at a time (streamed:
    # cynorm_row_input_gradient_float), after four rows' sums at a time where not streamed.
    for rows, groups, length, centered in ((45, 1, 48, True), (23, 1, 80, True), (13, 1, 256, True),
                                           (22, 2, 96, False), (70, 1, 16, True), (70, 2, 16, False),
                                           (9, 1, 528, True), (6, 2, 528, False)):
        x = (-3e3 + rng.standard_normal(rows * groups * length)).astype(dtype)
        if length == 256:
            x[5 * length:5 * length + 32] += 1e3
            x[9 * length:9 * length + 32] -= 5e2
            x[10 * length:11 * length] *= 1e18
        dy = rng.standard_normal(x.size).astype(dtype)
        weight = rng.standard_normal(groups * length).astype(dtype)
        bias = rng.standard_normal(groups * length).astype(dtype)
        y, mean, rstd = output_like(x), np.empty(rows * groups), np.empty(rows * groups)
        module.forward_rows(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, rows * groups, groups,
                            length, 1, 1e-5, centered, stream, stream, 2)
        dx, dweight, dbias = output_like(x), np.empty_like(weight), np.empty_like(weight)
        module.backward_rows(at(dy), at(x), at(mean), at(rstd), at(weight), at(dx), at(dweight), at(dbias), float64,
                             rows * groups, groups, length, 1, centered, stream, stream, 2)
        results += [y, mean, rstd, dx, dweight, dbias]

    # channels-first groups of 9 channels of 7, 20 and 49 values (AVX-512 and AVX2 builds sum four channels at a
    # time in the backward: values left one by one, 8 lanes, 32 lanes), a channel left over; groups of one channel
    # of 20 and 64 values (instance norm: four samples' rows of a channel at a time, rows left over; the
    # backward's 4 blocks of samples need 4 samples each); and short rows of 16 channels of 4 values (2x2 maps),
    # normalized with their channels' constants spread
    for samples, groups, chans_per_group, inner in ((3, 4, 9, 49), (2, 3, 9, 20), (4, 2, 9, 7), (19, 3, 1, 20),
                                                    (33, 2, 1, 64), (11, 3, 16, 4)):
        x = (5e3 + rng.standard_normal(samples * groups * chans_per_group * inner)).astype(dtype)
        dy = rng.standard_normal(x.size).astype(dtype)
        weight = rng.standard_normal(groups * chans_per_group).astype(dtype)
        bias = rng.standard_normal(groups * chans_per_group).astype(dtype)
        y, mean, rstd = output_like(x), np.empty(samples * groups), np.empty(samples * groups)
        module.forward_rows(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, samples * groups,
                            groups, chans_per_group, inner, 1e-5, True, stream, stream, 2)
        dx, dweight, dbias = output_like(x), np.empty_like(weight), np.empty_like(weight)
        module.backward_rows(at(dy), at(x), at(mean), at(rstd), at(weight), at(dx), at(dweight), at(dbias), float64,
                             samples * groups, groups, chans_per_group, inner, True, stream, stream, 2)
        results += [y, mean, rstd, dx, dweight, dbias]

    # one sample of 3 channels of 3000 values in 1 group (the backward shares out the channels)
    channels, inner = 3, 3000
    x = (rng.standard_normal(channels * inner) - 20).astype(dtype)
    dy = rng.standard_normal(x.size).astype(dtype)
    weight = rng.standard_normal(channels).astype(dtype)
    bias = rng.standard_normal(channels).astype(dtype)
    y, mean, rstd = output_like(x), np.empty(1), np.empty(1)
    module.forward_rows(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, 1, 1, channels, inner,
                        1e-5, True, stream, stream, 2)
    dx, dweight, dbias = output_like(x), np.empty_like(weight), np.empty_like(weight)
    module.backward_rows(at(dy), at(x), at(mean), at(rstd), at(weight), at(dx), at(dweight), at(dbias), float64,
                         1, 1, channels, inner, True, stream, stream, 2)
    results += [y, mean, rstd, dx, dweight, dbias]

    # channels-last samples of narrow rows (folded), and of rows of 160 columns in tiles of 150 rows (AVX2 builds
    # sum those eight rows at a time where not prefetched: 18 eights, a four and two rows left a tile)
    for samples, n_rows, n_cols, groups in ((3, 301, 24, 6), (2, 600, 160, 5)):
        x = (rng.standard_normal(samples * n_rows * n_cols) * 3 - 50).astype(dtype)
        dy = rng.standard_normal(x.size).astype(dtype)
        weight = rng.standard_normal(n_cols).astype(dtype)
        bias = rng.standard_normal(n_cols).astype(dtype)
        y, mean, rstd = output_like(x), np.empty(samples * groups), np.empty(samples * groups)
        module.forward_columns(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, samples, n_rows,
                               n_cols, groups, 1, False, 1e-5, True, stream, stream, 2)
        dx, dweight, dbias = output_like(x), np.empty_like(weight), np.empty_like(weight)
        module.backward_columns(at(dy), at(x), at(mean), at(rstd), at(weight), at(dx), at(dweight), at(dbias),
                                float64, samples, n_rows, n_cols, groups, 1, False, True, stream, stream, 2)
        results += [y, mean, rstd, dx, dweight, dbias]

    # a channels-last sample of one tile taken in blocks of column groups (not where streamed), 256 float32 or
    # 128 float64 columns wide: AVX-512 builds sum them in register strips, over rows further apart than that;
    # one group's first rows far from the rest of it
    n_rows, n_cols, groups = 120, 1024, 16
    x = (rng.standard_normal(n_rows * n_cols) * 2 + 300).astype(dtype)
    x.reshape(n_rows, n_cols)[8:, 64:128] += 5e3
    weight = rng.standard_normal(n_cols).astype(dtype)
    bias = rng.standard_normal(n_cols).astype(dtype)
    y, mean, rstd = output_like(x), np.empty(groups), np.empty(groups)
    module.forward_columns(at(x), at(y), at(weight), at(bias), at(mean), at(rstd), float64, 1, n_rows, n_cols,
                           groups, 1, False, 1e-5, True, stream, stream, 2)
    results += [y, mean, rstd]
    return results


def _numpy_cpu_features():
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:   # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__
    return __cpu_features__


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or "X86_V3" not in _numpy_cpu_features(),
                    reason="NumPy reports the x86-64 levels on x86-64 only, from NumPy 2")
def test_cpu_level_agrees_with_numpy():
    # (builds by compilers other than GCC 12+ once read level 0 everywhere, and ran their baseline kernels)
    features = _numpy_cpu_features()
    expected = 4 if features["X86_V4"] else 3 if features["X86_V3"] else 0
    assert cpu_level() == expected


@pytest.mark.skipif(len(BUILDS) < 2, reason="only one build of the kernels runs on this CPU")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("build", BUILDS[1:])
def test_builds_give_identical_bits(build, dtype):
    reference = _run_all_kernels(_module(BUILDS[0]), dtype, stream=False)
    for got, expected in zip(_run_all_kernels(_module(build), dtype, stream=False), reference):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("output_phase", [0, 4, 16, 52])   # (52: float64 values not on 8-byte boundaries)
def test_streamed_stores_give_identical_bits(build, dtype, output_phase):
    # each build has its own vector width of streaming stores, and AVX-512 builds carry a thread's partial lines
    # from row to row; nothing is written outside the outputs
    reference = _run_all_kernels(_module(build), dtype, stream=False)
    guards = []
    for got, expected in zip(_run_all_kernels(_module(build), dtype, stream=True, output_phase=output_phase,
                                              guards=guards), reference):
        np.testing.assert_array_equal(got, expected)
    for memory, start, end in guards:
        assert (memory[:start] == _GUARD).all() and (memory[end:] == _GUARD).all()


@pytest.mark.skipif(not _kernels.HAVE_FLOAT16, reason="built without _Float16")
@pytest.mark.parametrize("build", BUILDS)
def test_float16_conversions_match_numpy(build):
    module = _module(build)
    every_half = np.arange(2 ** 16, dtype=np.uint16)
    widened = np.empty(every_half.size, np.float32)
    module.half_to_float(every_half, widened, 2)
    np.testing.assert_array_equal(widened, every_half.view(np.float16).astype(np.float32))

    rng = np.random.default_rng(3)
    values = np.concatenate([rng.standard_normal(100_000) * 3e4, rng.standard_normal(100_000) * 1e-6,
                             [np.nan, np.inf, -np.inf, 65504, 65520, -0.0, 6e-8, 3e-8]]).astype(np.float32)
    rounded = np.empty(values.size, np.uint16)
    module.float_to_half(values, rounded, 2)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(rounded.view(np.float16), expected)

    # every length up to three vectors, from every position in one, and a length across the conversions' blocks
    for length in list(range(25)) + [40_003]:
        for start in range(8):
            halves = every_half[start:start + length]
            widened = np.full(length, np.nan, np.float32)
            module.half_to_float(halves, widened, 2)
            np.testing.assert_array_equal(widened, halves.view(np.float16).astype(np.float32))
            rounded = np.zeros(length, np.uint16)
            module.float_to_half(values[start:start + length], rounded, 2)
            np.testing.assert_array_equal(rounded.view(np.float16), expected[start:start + length])
