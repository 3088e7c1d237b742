"""The benchmark code: the shape table, the timing loop, `cynorm bench` end to end and the asv suite."""
import importlib
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

import numpy as np
import pytest

import cynorm
from cynorm import benchmarks as bench
from cynorm import slow

ASV_DIR = pathlib.Path(__file__).resolve().parents[1] / "asv_bench"
ASV_MODULES = ("bench_cynorm", "bench_torch", "bench_keras", "bench_cynorm_torch", "bench_cynorm_keras",
               "bench_reference")

# Every operation and layout, small enough for a test.
TINY_CASES = (
    bench.Case("group_norm", (2, 8, 4, 4), bench.CHANNELS_LAST, num_groups=4, quick=True),
    bench.Case("instance_norm", (2, 3, 4, 4), bench.CHANNELS_FIRST, quick=True),
    bench.Case("layer_norm", (3, 5, 4), bench.MIDDLE_AXIS, quick=True),
    bench.Case("rms_norm", (4, 16), bench.LAST_AXIS, quick=True),
)


def _usable_cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture(autouse=True)
def _restore_thread_settings():
    """Contenders set cynorm's and torch's process-wide thread counts: put them back for the other tests."""
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch else None
    with cynorm.num_threads(None):
        yield
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)


@pytest.fixture(autouse=True)
def _default_allocator(monkeypatch):
    """`cynorm bench` sets the process's malloc to keep freed memory; the tests of fresh outputs need the default."""
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: True)


@pytest.fixture
def fast_timing(monkeypatch):
    monkeypatch.setattr(bench, "MIN_SAMPLE_SECONDS", 0.0)
    monkeypatch.setattr(bench, "SETTLE_SECONDS", 0.0)


def _reference_forward(case, workload):
    groups = (case.num_groups,) if case.operation == "group_norm" else ()
    params = (workload.weight,) if case.operation == "rms_norm" else (workload.weight, workload.bias)
    return getattr(slow, case.operation)(workload.x, *groups, *params, axis=case.axis, eps=bench.EPS)


# --- the shape table ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", bench.SHAPE_TABLE, ids=lambda case: case.label)
def test_table_case_is_consistent(case):
    assert case.operation in bench.OPERATIONS
    assert case.layout in bench.LAYOUTS[case.operation]
    assert all(isinstance(n, int) and n > 0 for n in case.shape)
    assert sorted(case.array_shape) == sorted(case.shape)
    assert case.param_shape == (case.array_shape[case.axis],)
    if case.operation in ("group_norm", "instance_norm"):
        assert len(case.shape) >= 3, "needs spatial axes"
        assert case.param_shape == (case.shape[1],)
    if case.operation == "group_norm":
        assert case.num_groups > 0 and case.shape[1] % case.num_groups == 0
    else:
        assert case.num_groups is None
    if case.layout == bench.MIDDLE_AXIS:
        assert len(case.shape) >= 3, "the middle axis must not be the last"


def test_table_has_unique_cases_covering_every_operation_and_layout():
    labels = [case.label for case in bench.SHAPE_TABLE]
    assert len(labels) == len(set(labels))
    assert {(case.operation, case.layout) for case in bench.SHAPE_TABLE} == {
        (operation, layout) for operation, layouts in bench.LAYOUTS.items() for layout in layouts}
    assert {case.operation for case in bench.SHAPE_TABLE if case.quick} == set(bench.OPERATIONS)


def test_find_case():
    case = bench.SHAPE_TABLE[0]
    assert bench.find_case(case.operation, list(case.shape), case.layout) is case
    assert bench.find_case("layer_norm", (4, 64), bench.MIDDLE_AXIS) is None


def test_workload_is_seeded_and_shaped_like_the_case():
    case = TINY_CASES[0]
    first, second = bench.make_workload(case, "float16"), bench.make_workload(case, "float16")
    np.testing.assert_array_equal(first.x, second.x)
    assert first.x.shape == first.dy.shape == case.array_shape and first.x.dtype == np.float16
    assert first.x.flags.c_contiguous
    assert first.weight.shape == first.bias.shape == case.param_shape


# --- contenders ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["cynorm", "torch", "keras", "reference"])
def test_contender_computes_the_case_operation(name):
    """Every contender normalizes the same axes of the same data: the table's layouts reach each peer right."""
    contender = bench.CONTENDERS[name]
    try:
        contender.check()
    except bench.PeerUnavailable as exc:
        pytest.skip(str(exc))
    for case in TINY_CASES:
        workload = bench.make_workload(case, "float32")
        runner = contender.prepare(workload, _usable_cpus())
        y = runner.to_array(runner.forward())
        np.testing.assert_allclose(y, _reference_forward(case, workload), rtol=1e-4, atol=1e-4, err_msg=case.label)


def test_roofline_copy_copies_x(monkeypatch):
    workload = bench.make_workload(TINY_CASES[0])
    contender = bench.CONTENDERS["copy"]
    copies = [contender.prepare(workload, 2).forward()]  # torch's copy_ where torch is installed
    monkeypatch.setitem(sys.modules, "torch", None)
    copies.append(contender.prepare(workload, 2).forward())  # NumPy slices on a thread pool
    for copied in copies:
        np.testing.assert_array_equal(np.asarray(copied).reshape(workload.x.shape), workload.x)


# --- timing and summary --------------------------------------------------------------------------------------

def test_time_interleaved_varies_the_order_and_collects_every_sample(fast_timing, monkeypatch):
    monkeypatch.setattr(bench, "REWARM_BELOW_SECONDS", 0.0)
    log = []
    functions = {name: (lambda name=name: log.append(name)) for name in "abc"}
    timings = bench.time_interleaved(functions, repeat=12)
    assert log[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up, then one call per sample
    rounds = [log[6 + 3 * k:9 + 3 * k] for k in range(12)]
    assert all(sorted(calls) == list("abc") for calls in rounds)
    # each contender follows each other one, within rounds, and in the same order on every run
    assert {(first, second) for calls in rounds for first, second in zip(calls, calls[1:])} == {
        (first, second) for first in "abc" for second in "abc" if first != second}
    log.clear()
    bench.time_interleaved(functions, repeat=12)
    assert log[6:] == [name for calls in rounds for name in calls]
    for timing in timings.values():
        assert len(timing["samples"]) == 12 and timing["calls_per_sample"] == 1
        assert timing["min"] <= timing["median"]


def test_summarize_derives_speedups_bandwidth_and_roofline_from_the_medians():
    case = bench.SHAPE_TABLE[0]
    medians = {"cynorm": 2e-3, "torch": 3e-3, "cynorm.torch": 2.5e-3, "copy": 1e-3}
    timings = {name: {"median": s, "min": s, "samples": [s], "calls_per_sample": 1} for name, s in medians.items()}
    row = bench.summarize(case, "float32", "training_step", timings, bench.CONTENDERS)
    assert row["speedup"] == pytest.approx({"cynorm vs torch": 1.5, "cynorm.torch vs torch": 1.2})
    passes = bench.ARRAY_PASSES["training_step"]
    assert row["gb_per_s"] == pytest.approx(passes * math.prod(case.shape) * 4 / 2e-3 / 1e9)
    assert row["roofline_fraction"] == pytest.approx(1e-3 * passes / bench.ARRAY_PASSES["forward"] / 2e-3)
    assert row["median_ms"]["torch"] == pytest.approx(3.0)


def _process_row(case, direction, seconds):
    timings = {name: {"median": s, "min": s / 2, "samples": [s], "calls_per_sample": 1} for name, s in seconds.items()}
    return bench.summarize(case, "float32", direction, timings, bench.CONTENDERS)


def test_combine_processes_takes_the_medians_of_the_processes_and_the_range_of_their_speedups():
    case = bench.SHAPE_TABLE[0]
    # the adapter's speed-up runs 1.5, 1.0, 1.2 over the processes; torch is missing from none, "keras" from one
    seconds = [{"cynorm": 2e-3, "torch": 3e-3, "cynorm.torch": 2e-3, "keras": 5e-3, "copy": 1e-3},
               {"cynorm": 4e-3, "torch": 4e-3, "cynorm.torch": 4e-3, "copy": 2e-3},
               {"cynorm": 3e-3, "torch": 6e-3, "cynorm.torch": 5e-3, "keras": 9e-3, "copy": 1.5e-3}]
    runs = [[_process_row(case, direction, times) for direction in bench.DIRECTIONS] for times in seconds]
    rows = bench.combine_processes(runs)
    assert [row["direction"] for row in rows] == list(bench.DIRECTIONS)
    row = rows[0]
    assert row["processes"] == 3 and row["shape"] == list(case.shape) and row["num_groups"] == case.num_groups
    assert row["median_ms"] == pytest.approx({"cynorm": 3.0, "torch": 4.0, "cynorm.torch": 4.0, "copy": 1.5})
    assert row["timings"]["torch"]["process_medians_ms"] == pytest.approx([3.0, 4.0, 6.0])
    assert row["timings"]["torch"]["min_ms"] == pytest.approx(1.5)
    # the median of the processes' ratios (1.5, 1.0, 2.0), not the ratio of the medians (4/3)
    assert row["speedup"] == pytest.approx({"cynorm vs torch": 1.5, "cynorm.torch vs torch": 1.2})
    assert set(row["speedup_range"]) == set(row["speedup"])
    assert row["speedup_range"]["cynorm vs torch"] == pytest.approx([1.0, 2.0])
    assert row["speedup_range"]["cynorm.torch vs torch"] == pytest.approx([1.0, 1.5])
    assert row["roofline_fraction"] == pytest.approx(0.5)
    assert row["gb_per_s"] == pytest.approx(statistics.median(r[0]["gb_per_s"] for r in runs))
    table = bench.format_table(rows, ["cynorm", "torch", "cynorm.torch"], markdown=True)
    assert "| 1.50 (1.00-2.00) | 1.20 (1.00-1.50) |" in table


def test_combine_processes_refuses_processes_that_ran_other_cases():
    first, second = bench.SHAPE_TABLE[:2]
    times = {"cynorm": 2e-3, "torch": 3e-3}
    with pytest.raises(ValueError, match="the same cases in the same order"):
        bench.combine_processes([[_process_row(first, "forward", times)], [_process_row(second, "forward", times)]])
    with pytest.raises(ValueError, match="the same cases in the same order"):
        bench.combine_processes([[_process_row(first, "forward", times)],
                                 [_process_row(first, "forward", times), _process_row(second, "forward", times)]])


# --- `cynorm bench` -----------------------------------------------------------------------------------------

def test_bench_runs_end_to_end_and_writes_json_and_png(tmp_path, capsys, fast_timing):
    json_path, png_path = tmp_path / "bench.json", tmp_path / "bench.png"
    status = bench.main(["--quick", "--repeat", "1", "--threads", "1", "--peers", "torch,reference",
                         "--json", str(json_path), "--plot", str(png_path), "--no-progress"], cases=TINY_CASES)
    assert status == 0
    out = capsys.readouterr().out
    assert "CPU:" in out and "cynorm ms" in out and "roofline" in out
    assert "Memory: malloc keeps freed blocks" in out
    result = json.loads(json_path.read_text())
    assert result["machine"]["threads"] == 1 and result["repeat"] == 1 and result["machine"]["keeps_freed_memory"]
    assert "numpy" in result["machine"]["versions"]
    rows = result["results"]
    assert [(row["operation"], row["direction"]) for row in rows] == [
        (case.operation, direction) for case in TINY_CASES for direction in bench.DIRECTIONS]
    expected = {"cynorm", "reference", "copy"} | ({"torch"} if "torch" in result["machine"]["contenders"] else set())
    for row in rows:
        assert set(row["median_ms"]) == expected
        assert all(ms > 0 for ms in row["median_ms"].values())
        assert row["roofline_fraction"] > 0 and row["gb_per_s"] > 0
    assert png_path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_bench_runs_each_of_several_processes_fresh_and_reports_their_medians(tmp_path, capsys, monkeypatch):
    pools = []

    class RecordedPool(bench.ProcessPoolExecutor):
        def __init__(self, max_workers, mp_context):
            super().__init__(max_workers=max_workers, mp_context=mp_context)
            pools.append((max_workers, mp_context.get_start_method()))

    monkeypatch.setattr(bench, "ProcessPoolExecutor", RecordedPool)
    json_path = tmp_path / "bench.json"
    status = bench.main(["--processes", "2", "--repeat", "1", "--threads", "1", "--peers", "reference",
                         "--json", str(json_path), "--no-progress"], cases=TINY_CASES[:2])
    assert status == 0
    assert pools == [(1, "spawn"), (1, "spawn")]   # a new interpreter for each process
    captured = capsys.readouterr()
    assert "process 1 of 2" in captured.err and "process 2 of 2" in captured.err
    assert "medians over 2 processes" in captured.out
    result = json.loads(json_path.read_text())
    assert result["processes"] == 2
    rows = result["results"]
    assert [(row["operation"], row["direction"]) for row in rows] == [
        (case.operation, direction) for case in TINY_CASES[:2] for direction in bench.DIRECTIONS]
    for row in rows:
        assert row["processes"] == 2 and set(row["median_ms"]) == {"cynorm", "reference", "copy"}
        for name, timing in row["timings"].items():
            assert len(timing["process_medians_ms"]) == 2
            assert row["median_ms"][name] == pytest.approx(statistics.median(timing["process_medians_ms"]))
        low, high = row["speedup_range"]["cynorm vs reference"]
        assert 0 < low <= row["speedup"]["cynorm vs reference"] <= high
        assert f"({low:.2f}-{high:.2f})" in captured.out


def test_bench_skips_missing_peers_and_progress_bar_with_a_message(tmp_path, capsys, monkeypatch, fast_timing):
    for module in ("torch", "tensorflow", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, module, None)  # `import torch` now raises ImportError
    json_path = tmp_path / "bench.json"
    status = bench.main(["--ops", "layer_norm", "--quick", "--repeat", "1", "--threads", "1", "--markdown",
                         "--peers", "torch,keras", "--json", str(json_path)], cases=TINY_CASES)
    assert status == 0
    captured = capsys.readouterr()
    assert "skipping torch: torch is not installed" in captured.err
    assert "skipping keras: tensorflow is not installed" in captured.err
    assert "install tqdm to see progress" in captured.err
    assert "| operation |" in captured.out and "torch ms" not in captured.out
    result = json.loads(json_path.read_text())
    assert set(result["machine"]["contenders"]) == {"cynorm", "copy"}
    assert "NumPy" in result["machine"]["contenders"]["copy"]
    assert {row["operation"] for row in result["results"]} == {"layer_norm"}


# In a fresh process, since the setting lasts for the process.  With it, a freed 16 MiB block comes back with its
# pages for the next request of that size.  With glibc's defaults the first one goes back to the OS and the second
# request grows the heap with fresh pages (only later ones reuse memory; in a process with a longer history,
# reuse comes and goes).
_FREED_MEMORY_PROBE = """
import sys, numpy as np
from cynorm import _kernels, benchmarks
kept = benchmarks.keep_freed_memory() if sys.argv[1] == "keep" else False
reused = []
for _ in range(4):
    block = np.empty(2 ** 22, np.float32)
    reused.append(not _kernels.has_untouched_pages(block.ctypes.data, block.nbytes))
    block.fill(1)
    del block
print(kept, all(reused[1:]))
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION")),
                    reason="the setting is glibc's")
def test_keep_freed_memory_reuses_freed_blocks_with_their_pages():
    def probe(mode):
        return subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, mode], capture_output=True, text=True,
                              check=True).stdout.split()
    assert probe("keep") == ["True", "True"]
    assert probe("default") == ["False", "False"]


@pytest.mark.parametrize("argv, message", [
    (["--ops", "batch_norm"], "unknown operation batch_norm"),
    (["--peers", "onnx"], "unknown peer onnx"),
    (["--repeat", "0"], "must be a positive integer"),
    (["--processes", "0"], "must be a positive integer"),
])
def test_bench_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.main(argv, cases=TINY_CASES)
    assert message in capsys.readouterr().err


def test_bench_rejects_a_selection_without_cases(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--ops", "rms_norm"], cases=TINY_CASES[:1])
    assert "no case of the table matches" in capsys.readouterr().err


def test_import_does_not_load_the_frameworks_or_the_plotting():
    code = ("import sys, cynorm, cynorm.benchmarks; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'matplotlib', 'tqdm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the asv suite ------------------------------------------------------------------------------------------

@pytest.fixture
def asv_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ASV_DIR))
    for name in [name for name in sys.modules if name == "benchmarks" or name.startswith("benchmarks.")]:
        monkeypatch.delitem(sys.modules, name)
    return {name: importlib.import_module(f"benchmarks.{name}") for name in ASV_MODULES}


def _asv_classes(module):
    return [value for name, value in vars(module).items() if isinstance(value, type) and not name.startswith("_")]


def test_asv_classes_cover_the_table(asv_modules):
    for module in asv_modules.values():
        classes = _asv_classes(module)
        assert sorted(cls.operation for cls in classes) == sorted(bench.OPERATIONS)
        for cls in classes:
            assert cls.__module__ == module.__name__ and cls.__doc__
            assert cls.param_names == ["shape", "layout", "dtype", "threads"]
            shapes, layouts = cls.params[0], cls.params[1]
            for case in bench.SHAPE_TABLE:
                if case.operation == cls.operation:
                    assert case.shape in shapes and case.layout in layouts


@pytest.mark.parametrize("module_name", ASV_MODULES)
def test_asv_setup_runs_for_one_parameter_set(asv_modules, module_name):
    module = asv_modules[module_name]
    benchmark = next(cls for cls in _asv_classes(module) if cls.operation == "layer_norm")()
    # TensorFlow's pool is fixed once it runs
    threads = _usable_cpus() if module_name in ("bench_keras", "bench_cynorm_keras") else 1
    try:
        benchmark.setup((4, 64), bench.LAST_AXIS, "float32", threads)
    except NotImplementedError as exc:
        pytest.skip(str(exc))
    benchmark.time_forward()
    benchmark.time_backward()
    benchmark.peakmem_forward()


def test_asv_output_placement_runs(asv_modules):
    module = importlib.import_module("benchmarks.bench_output_placement")
    benchmark = module.OutputPlacement()
    benchmark.setup(48, bench.CHANNELS_LAST)
    assert benchmark.out.ctypes.data % 64 == 48
    benchmark.time_forward(48, bench.CHANNELS_LAST)
    expected = cynorm.group_norm(benchmark.workload.x, 32, benchmark.workload.weight, benchmark.workload.bias,
                                 axis=-1)
    np.testing.assert_array_equal(benchmark.out, expected)
    benchmark.time_backward(48, bench.CHANNELS_LAST)
    expected, _, _ = cynorm.group_norm_backward(benchmark.workload.dy, benchmark.workload.x, benchmark.mean,
                                                benchmark.rstd, benchmark.workload.weight, axis=-1)
    np.testing.assert_array_equal(benchmark.out, expected)


def test_asv_layer_norm_output_placement_runs(asv_modules):
    module = importlib.import_module("benchmarks.bench_output_placement")
    benchmark = module.LayerNormOutputPlacement()
    benchmark.setup(16)
    workload = benchmark.workload
    assert benchmark.out.ctypes.data % 64 == 16
    benchmark.time_forward(16)
    np.testing.assert_array_equal(benchmark.out, cynorm.layer_norm(workload.x, workload.weight, workload.bias))
    benchmark.time_backward(16)
    expected, _, _ = cynorm.layer_norm_backward(workload.dy, workload.x, benchmark.mean, benchmark.rstd,
                                                workload.weight)
    np.testing.assert_array_equal(benchmark.out, expected)


def test_asv_array_placement_runs(asv_modules):
    module = importlib.import_module("benchmarks.bench_output_placement")
    benchmark = module.ArrayPlacement()
    benchmark.setup(16, bench.CHANNELS_FIRST)
    assert benchmark.x.ctypes.data % 64 == benchmark.out.ctypes.data % 64 == 16
    benchmark.time_forward(16, bench.CHANNELS_FIRST)
    np.testing.assert_array_equal(benchmark.out, cynorm.group_norm(benchmark.x, 32, benchmark.weight, benchmark.bias))


def test_asv_setup_skips_missing_peers_and_cases_outside_the_table(asv_modules, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(NotImplementedError, match="torch is not installed"):
        asv_modules["bench_torch"].TorchLayerNorm().setup((4, 64), bench.LAST_AXIS, "float32", 1)
    with pytest.raises(NotImplementedError, match="not in cynorm's shape table"):
        asv_modules["bench_cynorm"].LayerNorm().setup((4, 64), bench.MIDDLE_AXIS, "float32", 1)
