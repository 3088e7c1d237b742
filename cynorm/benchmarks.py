"""Benchmarks of the cynorm kernels against PyTorch and Keras: the shape table and ``cynorm bench``.

``SHAPE_TABLE`` lists the cases we care about, shapes taken from real models; the asv suite in ``asv_bench/``
imports it too, so both measure the same thing.  Every contender runs a case through a ``Runner`` with two
timed calls:

* ``forward``: inference, ``y = norm(x)``.  cynorm writes into a preallocated ``out=``; the frameworks run their
  own op the way a user calls it (torch.nn.functional, a Keras layer inside ``tf.function``, or eagerly where
  Keras runs on torch).
* ``training_step``: one training step through the layer: a forward that keeps what the backward needs, then the
  gradients for x, weight and bias.  Keras can only take gradients of a recorded forward (``GradientTape``), so
  every contender is timed the same way.

The roofline is a memory copy of x on the same threads: the forward moves at least one read and one write of x
(one copy), a training step five array passes (x, y, dy, x, dx: two and a half copies).

torch, tensorflow, matplotlib and tqdm are imported only when used: ``import cynorm`` does not need them, and a
missing peer is skipped with a message.
"""
import argparse
import ctypes
import dataclasses
import functools
import importlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

import cynorm

__all__ = [
    "Case", "SHAPE_TABLE", "OPERATIONS", "LAYOUTS", "DIRECTIONS", "CONTENDERS", "PeerUnavailable", "Runner",
    "Workload", "find_case", "make_workload", "time_interleaved", "summarize", "run", "machine_info",
    "combine_processes", "format_table", "plot", "main",
]

OPERATIONS = ("group_norm", "instance_norm", "layer_norm", "rms_norm")

CHANNELS_FIRST = "channels_first"  # (N, C, *spatial), channel axis 1
CHANNELS_LAST = "channels_last"    # (N, *spatial, C), channel axis -1
LAST_AXIS = "last_axis"            # normalized over the last axis (torch's normalized_shape)
MIDDLE_AXIS = "middle_axis"        # normalized over axis 1 (Keras LayerNormalization(axis=1))

LAYOUTS = {
    "group_norm": (CHANNELS_FIRST, CHANNELS_LAST),
    "instance_norm": (CHANNELS_FIRST, CHANNELS_LAST),
    "layer_norm": (LAST_AXIS, MIDDLE_AXIS),
    "rms_norm": (LAST_AXIS,),
}

_AXIS = {CHANNELS_FIRST: 1, CHANNELS_LAST: -1, LAST_AXIS: -1, MIDDLE_AXIS: 1}

# One epsilon for every contender, so that all of them compute the same function.
EPS = 1e-5

# Array passes of the least memory traffic, per timed call (see the module docstring).
ARRAY_PASSES = {"forward": 2, "training_step": 5}
DIRECTIONS = tuple(ARRAY_PASSES)
_DIRECTION_LABELS = {"forward": "fwd", "training_step": "fwd+bwd"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: an operation on an array of a given shape and memory layout.

    ``shape`` is the logical shape as the frameworks write it: ``(N, C, *spatial)`` for group and instance norm in
    either layout (``array_shape`` is the shape in memory), the array's own shape for layer and RMS norm.
    """

    operation: str
    shape: tuple
    layout: str
    num_groups: int = None
    source: str = ""
    quick: bool = False

    @property
    def array_shape(self):
        """Shape of the C-contiguous array the kernels see."""
        if self.layout == CHANNELS_LAST:
            return (self.shape[0],) + tuple(self.shape[2:]) + (self.shape[1],)
        return tuple(self.shape)

    @property
    def axis(self):
        """The ``axis`` argument of the cynorm call on ``array_shape``."""
        return _AXIS[self.layout]

    @property
    def param_shape(self):
        """Shape of weight and bias."""
        return (self.array_shape[self.axis],)

    @property
    def label(self):
        groups = f" G={self.num_groups}" if self.operation == "group_norm" else ""
        return f"{self.operation}{groups} {_shape_text(self.shape)} {self.layout}"

    def nbytes(self, dtype):
        return math.prod(self.shape) * np.dtype(dtype).itemsize


def _shape_text(shape):
    return "(" + ",".join(str(n) for n in shape) + ")"


def _in_both_layouts(operation, shapes, quick=(), **fields):
    """Cases of ``operation`` on each shape in each of its layouts; ``quick`` holds the (shape, layout) pairs of
    the ``--quick`` subset."""
    return tuple(Case(operation, shape, layout, quick=(shape, layout) in quick, **fields)
                 for shape in shapes for layout in LAYOUTS[operation])


SHAPE_TABLE = (
    *_in_both_layouts(
        "group_norm", [(8, 256, 56, 56), (1, 512, 64, 64), (16, 64, 32, 32), (4, 128, 128, 128), (2, 320, 64, 64)],
        quick={((8, 256, 56, 56), CHANNELS_FIRST), ((16, 64, 32, 32), CHANNELS_FIRST),
               ((16, 64, 32, 32), CHANNELS_LAST)},
        num_groups=32, source="ResNet/UNet stage"),
    *_in_both_layouts("instance_norm", [(8, 64, 128, 128), (1, 128, 256, 256)],
                      quick={((8, 64, 128, 128), CHANNELS_FIRST)}, source="style transfer"),
    Case("layer_norm", (4096, 768), LAST_AXIS, source="transformer tokens (BERT-base)", quick=True),
    Case("layer_norm", (8, 512, 1024), LAST_AXIS, source="transformer tokens (BERT-large)"),
    Case("layer_norm", (64, 4096), LAST_AXIS, source="transformer tokens (LLM hidden size)"),
    Case("layer_norm", (32, 26, 26, 10), MIDDLE_AXIS, source="Keras tutorial, LayerNormalization(axis=1)",
         quick=True),
    Case("layer_norm", (32, 26, 26, 10), LAST_AXIS, source="Keras tutorial, LayerNormalization(axis=3)"),
    Case("rms_norm", (2048, 4096), LAST_AXIS, source="LLM prefill rows", quick=True),
    Case("rms_norm", (1, 4096), LAST_AXIS, source="LLM decoding row"),
    Case("group_norm", (1, 32, 8, 8), CHANNELS_FIRST, num_groups=32, source="call overhead", quick=True),
    Case("layer_norm", (4, 64), LAST_AXIS, source="call overhead", quick=True),
)


def find_case(operation, shape, layout, cases=SHAPE_TABLE):
    """The case of ``cases`` with this operation, shape and layout, or None."""
    for case in cases:
        if (case.operation, tuple(case.shape), case.layout) == (operation, tuple(shape), layout):
            return case
    return None


@dataclasses.dataclass
class Workload:
    """Seeded input, output gradient and parameters of one case, shared by all contenders."""

    case: Case
    x: np.ndarray
    dy: np.ndarray
    weight: np.ndarray
    bias: np.ndarray


def make_workload(case, dtype="float32", seed=0):
    """Random data for ``case``; every page is written here, so no contender pays the first-touch faults."""
    rng = np.random.default_rng(seed)

    def draw(shape, loc=0.0, scale=1.0):
        return (loc + scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

    return Workload(case, x=draw(case.array_shape, loc=0.5), dy=draw(case.array_shape),
                    weight=draw(case.param_shape, loc=1.0, scale=0.1), bias=draw(case.param_shape, scale=0.1))


def empty_past_cache_line(shape, dtype, bytes_past_line):
    """A zero-filled C-contiguous array whose data starts ``bytes_past_line`` bytes into a 64-byte cache line."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    memory = np.zeros(nbytes + 128, np.uint8)
    start = -memory.ctypes.data % 64 + bytes_past_line
    return memory[start:start + nbytes].view(dtype).reshape(shape)


def _written_empty_like(array):
    out = np.empty_like(array)
    out.fill(0)
    return out


class PeerUnavailable(Exception):
    """A contender cannot run here (not installed, or configured in a way the benchmark cannot change)."""


@dataclasses.dataclass
class Runner:
    """The timed calls of one contender on one case.

    ``forward()`` and ``training_step()`` take no argument; ``forward()`` returns the output, which
    ``to_array`` converts to a NumPy array in the case's memory layout (for checking that a contender computes
    the right thing).
    """

    forward: object
    training_step: object
    to_array: object = np.asarray


class _Contender:
    """Runs the table's cases through the functions of one module.

    ``name`` heads its column, ``adapts`` names the framework contender an adapter replaces (its speed-up is
    measured against that one), ``check()`` raises PeerUnavailable when it cannot run here, and
    ``prepare(workload, threads)`` returns the case's Runner.
    """

    def __init__(self, name, module_name, description, adapts=None):
        self.name = name
        self.module_name = module_name
        self.description = description
        self.adapts = adapts


class _KernelContender(_Contender):
    """A module with cynorm's NumPy API: cynorm itself, or its float64 reference ``cynorm.slow``."""

    def __init__(self, name, module_name, description, writes_out):
        super().__init__(name, module_name, description)
        self.writes_out = writes_out

    def check(self):
        importlib.import_module(self.module_name)

    def prepare(self, workload, threads):
        module = importlib.import_module(self.module_name)
        cynorm.set_num_threads(threads)
        case = workload.case
        forward = getattr(module, case.operation)
        backward = getattr(module, case.operation + "_backward")
        groups = (case.num_groups,) if case.operation == "group_norm" else ()
        params = (workload.weight,) if case.operation == "rms_norm" else (workload.weight, workload.bias)
        y_out = {"out": _written_empty_like(workload.x)} if self.writes_out else {}
        dx_out = {"out": _written_empty_like(workload.x)} if self.writes_out else {}

        def run_forward():
            return forward(workload.x, *groups, *params, axis=case.axis, eps=EPS, **y_out)

        def run_training_step():
            _, *stats = forward(workload.x, *groups, *params, axis=case.axis, eps=EPS, return_stats=True, **y_out)
            return backward(workload.dy, workload.x, *stats, workload.weight, axis=case.axis, **dx_out)

        return Runner(run_forward, run_training_step)


def _import_torch():
    try:
        import torch
    except ImportError as exc:
        raise PeerUnavailable(f"torch is not installed ({exc})") from exc
    return torch


class _TorchContender(_Contender):
    """A module with torch.nn.functional's API: torch's own, or cynorm's PyTorch adapter."""

    def check(self):
        _import_torch()
        try:
            importlib.import_module(self.module_name)
        except ImportError as exc:
            raise PeerUnavailable(f"{self.module_name} cannot be imported ({exc})") from exc

    def prepare(self, workload, threads):
        torch = _import_torch()
        functional = importlib.import_module(self.module_name)
        torch.set_num_threads(threads)
        case = workload.case
        # Channels-last data is a logical (N, C, *spatial) tensor with channels-last strides, as torch sees it.
        to_logical, to_array = _torch_layout(case)
        x, dy = (to_logical(torch.from_numpy(a)) for a in (workload.x, workload.dy))
        params = [torch.from_numpy(workload.weight)]
        if case.operation != "rms_norm":
            params.append(torch.from_numpy(workload.bias))
        call = _torch_call(functional, case)
        inputs = [x.detach().requires_grad_()] + [p.detach().requires_grad_() for p in params]

        def run_forward():
            return call(x, *params)

        def run_training_step():
            return torch.autograd.grad(call(*inputs), inputs, dy)

        return Runner(run_forward, run_training_step, lambda y: to_array(y.detach()).numpy())


def _torch_layout(case):
    """Functions from the array layout to torch's logical layout and back."""
    if case.layout != CHANNELS_LAST:
        return (lambda t: t), (lambda t: t)
    return (lambda t: t.movedim(-1, 1)), (lambda t: t.movedim(1, -1))


def _torch_call(functional, case):
    """``call(x, weight[, bias])`` running the case's operation through a torch.nn.functional-like module."""
    if case.operation == "group_norm":
        return lambda x, weight, bias: functional.group_norm(x, case.num_groups, weight, bias, EPS)
    if case.operation == "instance_norm":
        return lambda x, weight, bias: functional.instance_norm(x, weight=weight, bias=bias, eps=EPS)
    if case.operation == "rms_norm":
        return lambda x, weight: functional.rms_norm(x, case.param_shape, weight, EPS)
    if case.layout == MIDDLE_AXIS:
        # torch normalizes trailing axes only: what a torch user writes for Keras's axis=1.
        return lambda x, weight, bias: functional.layer_norm(
            x.movedim(1, -1), case.param_shape, weight, bias, EPS).movedim(-1, 1)
    return lambda x, weight, bias: functional.layer_norm(x, case.param_shape, weight, bias, EPS)


def _import_tensorflow(threads):
    """TensorFlow with ``threads`` intra-op threads; its pools are fixed once it has run anything."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise PeerUnavailable(f"tensorflow is not installed ({exc})") from exc
    if threads is not None:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        except RuntimeError:
            current = tf.config.threading.get_intra_op_parallelism_threads()
            if current != threads and not (current == 0 and threads == _usable_cpus()):
                raise PeerUnavailable(f"TensorFlow already runs with {current or 'all'} intra-op threads in this "
                                      f"process, not {threads}") from None
    return tf


def _keras_backend():
    """The backend Keras runs on, with its framework imported; PeerUnavailable if either cannot be."""
    try:
        import keras
    except ImportError as exc:
        _import_tensorflow(threads=None)   # Keras's default backend, with its own message if it is what is missing
        raise PeerUnavailable(f"keras cannot be imported ({exc})") from exc
    backend = keras.backend.backend()
    if backend == "tensorflow":
        _import_tensorflow(threads=None)
    elif backend == "torch":
        _import_torch()
    else:
        raise PeerUnavailable(f"Keras runs on the {backend} backend, not tensorflow or torch")
    return backend


class _KerasContender(_Contender):
    """A module with keras.layers' normalization layers, Keras's own or cynorm's: inside ``tf.function`` where Keras
    runs on TensorFlow, eagerly where it runs on torch (as Keras's torch backend runs them)."""

    def check(self):
        _keras_backend()
        try:
            importlib.import_module(self.module_name)
        except ImportError as exc:
            raise PeerUnavailable(f"{self.module_name} cannot be imported ({exc})") from exc

    def prepare(self, workload, threads):
        if _keras_backend() == "torch":
            return self._prepare_on_torch(workload, threads)
        tf = _import_tensorflow(threads)
        layer = self._layer(workload)
        x, dy = tf.constant(workload.x), tf.constant(workload.dy)

        @tf.function
        def forward(x):
            return layer(x)

        @tf.function
        def training_step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x)
            return tape.gradient(y, [x, *layer.trainable_weights], output_gradients=dy)

        return Runner(lambda: forward(x), lambda: training_step(x, dy), lambda y: y.numpy())

    def _prepare_on_torch(self, workload, threads):
        torch = _import_torch()
        torch.set_num_threads(threads)
        layer = self._layer(workload)
        x, dy = torch.from_numpy(workload.x), torch.from_numpy(workload.dy)
        inputs = [x.detach().requires_grad_()] + [w.value for w in layer.trainable_weights]

        def run_forward():
            with torch.no_grad():   # as Keras's predict runs
                return layer(x)

        def run_training_step():
            return torch.autograd.grad(layer(inputs[0]), inputs, dy)

        return Runner(run_forward, run_training_step, lambda y: y.numpy())

    def _layer(self, workload):
        """The case's layer, built, with the workload's weight and bias."""
        layer = _keras_layer(importlib.import_module(self.module_name), workload.case, dtype=workload.x.dtype.name)
        layer.build(workload.x.shape)
        # Keras's names for the scale and the offset: the same parameters as every other contender.
        values = {"gamma": workload.weight, "scale": workload.weight, "beta": workload.bias}
        for variable in layer.weights:
            if variable.name in values:
                variable.assign(values[variable.name].reshape(variable.shape))
        return layer


def _keras_layer(layers, case, dtype):
    if case.operation == "group_norm":
        return layers.GroupNormalization(groups=case.num_groups, axis=case.axis, epsilon=EPS, dtype=dtype)
    if case.operation == "instance_norm":
        # groups=-1 is Keras's instance normalization: one group per channel.
        return layers.GroupNormalization(groups=-1, axis=case.axis, epsilon=EPS, dtype=dtype)
    if case.operation == "layer_norm":
        return layers.LayerNormalization(axis=case.axis, epsilon=EPS, dtype=dtype)
    return layers.RMSNormalization(axis=case.axis, epsilon=EPS, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _copy_pool(threads):
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cynorm-bench-copy")


class _CopyContender:
    """The roofline: one read and one write of x on the same threads.

    torch's ``copy_`` runs on torch's thread pool; without torch, NumPy copies one slice per thread from a
    thread pool (NumPy releases the GIL while it copies; ``np.copyto`` alone would use one core).
    """

    name = "copy"
    module_name = None
    adapts = None

    @property
    def description(self):
        try:
            _import_torch()
        except PeerUnavailable:
            return "NumPy copyto, one slice per thread"
        return "torch Tensor.copy_"

    def check(self):
        pass

    def prepare(self, workload, threads):
        source = workload.x.reshape(-1)
        target = _written_empty_like(source)
        try:
            torch = _import_torch()
        except PeerUnavailable:
            pool = _copy_pool(threads)
            bounds = np.linspace(0, source.size, threads + 1).astype(int)
            slices = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:])]

            def copy():
                for done in [pool.submit(np.copyto, target[s], source[s]) for s in slices]:
                    done.result()
                return target
        else:
            torch.set_num_threads(threads)
            source_tensor, target_tensor = torch.from_numpy(source), torch.from_numpy(target)

            def copy():
                return target_tensor.copy_(source_tensor)

        return Runner(copy, copy)


OURS = "cynorm"
ROOFLINE = "copy"
CONTENDERS = {
    contender.name: contender for contender in (
        _KernelContender(OURS, "cynorm", "cynorm NumPy API with out=", writes_out=True),
        _TorchContender("torch", "torch.nn.functional", "torch.nn.functional"),
        _KerasContender("keras", "keras.layers", "keras.layers (in tf.function on TensorFlow)"),
        _TorchContender("cynorm.torch", "cynorm.adapters.torch", "cynorm.adapters.torch functional API",
                        adapts="torch"),
        _KerasContender("cynorm.keras", "cynorm.adapters.keras",
                        "cynorm.adapters.keras layers (in tf.function on TensorFlow)", adapts="keras"),
        _KernelContender("reference", "cynorm.slow", "cynorm.slow, the float64 NumPy reference", writes_out=False),
        _CopyContender(),
    )
}
PEERS = tuple(name for name in CONTENDERS if name not in (OURS, ROOFLINE))
DEFAULT_PEERS = ("torch", "keras")

# Each timed sample lasts at least this long, so tiny calls are timed in batches above the clock's resolution.
MIN_SAMPLE_SECONDS = 2e-3
# Pause before each sample: OpenMP and Eigen workers of the previous contender spin for a while after their
# last task, and would steal the cores of the next one on a small machine.
SETTLE_SECONDS = 2e-3
# After the pause, the first call pays for waking its thread pool; calls shorter than this get an untimed one.
REWARM_BELOW_SECONDS = 20e-3


def _seconds_per_call(function, calls):
    start = time.perf_counter()
    for _ in range(calls):
        function()
    return (time.perf_counter() - start) / calls


def _calls_per_sample(function):
    """Calls per sample so that a sample lasts MIN_SAMPLE_SECONDS, and the seconds per call."""
    calls = 1
    while True:
        per_call = _seconds_per_call(function, calls)
        if per_call * calls >= MIN_SAMPLE_SECONDS or calls >= 100_000:
            return calls, per_call
        calls = min(100_000, max(2 * calls, math.ceil(1.2 * MIN_SAMPLE_SECONDS / max(per_call, 1e-9))))


def time_interleaved(functions, repeat):
    """Seconds per call of each function, timed in rounds that visit every function once.

    Interleaving spreads the machine's slow moments over all contenders, so their ratio stays fair.  Returns
    ``{name: {"median": s, "min": s, "samples": [s, ...], "calls_per_sample": n}}``.
    """
    calls, per_call = {}, {}
    for name, function in functions.items():
        function()  # warm-up: tracing, first touch, caches
        calls[name], per_call[name] = _calls_per_sample(function)
    names = list(functions)
    samples = {name: [] for name in names}
    # A new order each round, drawn from a fixed seed, so that no contender always follows the same neighbour: a
    # call right after torch's finds the caches as torch's left them (in an A/B harness without the re-warming
    # call below, ours ran 7-15% slower there).  Rotating the order kept each one's predecessor.
    orders = random.Random(0)
    for _ in range(repeat):
        for name in orders.sample(names, len(names)):
            time.sleep(SETTLE_SECONDS)
            if per_call[name] < REWARM_BELOW_SECONDS:
                functions[name]()
            samples[name].append(_seconds_per_call(functions[name], calls[name]))
    return {name: {"median": statistics.median(samples[name]), "min": min(samples[name]),
                   "samples": samples[name], "calls_per_sample": calls[name]} for name in names}


def summarize(case, dtype, direction, timings, contenders):
    """One result row: medians in ms, speed-ups, bandwidth and roofline fraction."""
    median_ms = {name: timing["median"] * 1e3 for name, timing in timings.items()}
    row = {
        "operation": case.operation, "shape": list(case.shape), "layout": case.layout,
        "array_shape": list(case.array_shape), "axis": case.axis, "num_groups": case.num_groups,
        "source": case.source, "dtype": np.dtype(dtype).name, "direction": direction,
        "median_ms": median_ms,
        "timings": {name: {"median_ms": t["median"] * 1e3, "min_ms": t["min"] * 1e3,
                           "samples_ms": [sample * 1e3 for sample in t["samples"]],
                           "calls_per_sample": t["calls_per_sample"]}
                    for name, t in timings.items()},
        "speedup": {}, "gb_per_s": None, "roofline_fraction": None,
    }
    if OURS not in median_ms:
        return row
    ours = median_ms[OURS]
    for name in median_ms:
        if name in (OURS, ROOFLINE):
            continue
        adapts = contenders[name].adapts
        if adapts is None:
            row["speedup"][f"{OURS} vs {name}"] = median_ms[name] / ours
        elif adapts in median_ms:
            # An adapter is worth using when it beats the framework op it replaces.
            row["speedup"][f"{name} vs {adapts}"] = median_ms[adapts] / median_ms[name]
    bytes_moved = ARRAY_PASSES[direction] * case.nbytes(dtype)
    row["gb_per_s"] = bytes_moved / (ours * 1e-3) / 1e9
    if ROOFLINE in median_ms:
        roofline_ms = median_ms[ROOFLINE] * ARRAY_PASSES[direction] / ARRAY_PASSES["forward"]
        row["roofline_fraction"] = roofline_ms / ours
    return row


def _available_contenders(names, say):
    available = {}
    for name in names:
        contender = CONTENDERS[name]
        try:
            contender.check()
        except PeerUnavailable as exc:
            say(f"skipping {name}: {exc}")
        else:
            available[name] = contender
    return available


def _runnable_calls(case, workload, contenders, threads, say):
    """``{direction: {name: call}}`` of the contenders that run this case; a peer that fails is reported and left
    out (ours is not: its errors are bugs)."""
    calls = {direction: {} for direction in DIRECTIONS}
    for name, contender in contenders.items():
        try:
            runner = contender.prepare(workload, threads)
        except Exception as exc:
            if name == OURS:
                raise
            say(f"skipping {name} on {case.label}: {type(exc).__name__}: {exc}")
            continue
        for direction in DIRECTIONS:
            call = getattr(runner, direction)
            try:
                call()  # also traces tf.functions and writes the outputs once
            except Exception as exc:
                if name == OURS:
                    raise
                say(f"skipping {name} {_DIRECTION_LABELS[direction]} on {case.label}: {type(exc).__name__}: {exc}")
            else:
                calls[direction][name] = call
    return calls


def run(cases, contenders, *, dtype="float32", repeat=25, threads=None, progress=True, say=print):
    """Time every case forward and as a training step with every contender; a list of result rows."""
    threads = threads or _usable_cpus()
    rows = []
    bar = _progress_bar(total=len(cases), enabled=progress)
    try:
        for case in cases:
            bar.describe(case.label)
            calls = _runnable_calls(case, make_workload(case, dtype), contenders, threads, say)
            for direction in DIRECTIONS:
                timings = time_interleaved(calls[direction], repeat)
                rows.append(summarize(case, dtype, direction, timings, contenders))
            bar.update()
    finally:
        bar.close()
    return rows


def _rows_in_this_process(cases, names, dtype, repeat, threads, progress, label):
    """run() on the contenders ``names``, in a process of its own (see main's ``--processes``): its page placement
    and allocator history are its own, and so are the medians."""
    def say(message):
        print(f"{label}: {message}", file=sys.stderr, flush=True)

    keep_freed_memory()
    contenders = _available_contenders(names, say=lambda message: None)   # (the parent has said which are missing)
    with cynorm.num_threads(threads):
        return run(cases, contenders, dtype=dtype, repeat=repeat, threads=threads, progress=progress, say=say)


def _rows_in_fresh_processes(processes, cases, names, dtype, repeat, threads, progress, say):
    """The rows of run() in each of ``processes`` new interpreters, one after the other (spawned: fork would give
    each the parent's memory)."""
    context = multiprocessing.get_context("spawn")
    runs = []
    for index in range(processes):
        label = f"process {index + 1} of {processes}"
        say(label)
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            runs.append(pool.submit(_rows_in_this_process, cases, names, dtype, repeat, threads, progress,
                                    label).result())
    return runs


def combine_processes(runs):
    """One row per case from the rows of several processes (each a list from run() on the same cases): for each
    contender the median of the processes' medians, and for each speed-up the median of the processes' speed-ups
    with their range (``speedup_range``).  A contender or speed-up missing from any process is left out.

    Each process times its contenders interleaved, so their ratio is fair within it, but for the arrays it made:
    on six fresh sets of arrays in one process, channels-first GroupNorm (1,512,64,64) took 0.34-0.58 ms on the
    kernels and 0.51-0.78 ms with torch's (Zen 3), torch's over ours 1.23-1.82x.  More samples in one process
    do not average that out; more processes do.
    """
    rows = []
    if len({len(rows_of_one) for rows_of_one in runs}) > 1:
        raise ValueError("combine_processes() expects the same cases in the same order from every process")
    for versions in zip(*runs):
        first = versions[0]
        keys = ("operation", "shape", "layout", "direction")
        if any([version[key] for key in keys] != [first[key] for key in keys] for version in versions):
            raise ValueError("combine_processes() expects the same cases in the same order from every process")
        names = [name for name in first["median_ms"] if all(name in version["median_ms"] for version in versions)]
        speedups = [key for key in first["speedup"] if all(key in version["speedup"] for version in versions)]
        row = {key: value for key, value in first.items() if key not in _PER_PROCESS_FIELDS}
        row["processes"] = len(versions)
        row["median_ms"] = {name: statistics.median(version["median_ms"][name] for version in versions)
                            for name in names}
        row["timings"] = {name: {"process_medians_ms": [version["median_ms"][name] for version in versions],
                                 "min_ms": min(version["timings"][name]["min_ms"] for version in versions)}
                          for name in names}
        row["speedup"] = {key: statistics.median(version["speedup"][key] for version in versions)
                          for key in speedups}
        row["speedup_range"] = {key: [min(version["speedup"][key] for version in versions),
                                      max(version["speedup"][key] for version in versions)] for key in speedups}
        for field in ("gb_per_s", "roofline_fraction"):
            values = [version[field] for version in versions if version[field] is not None]
            row[field] = statistics.median(values) if len(values) == len(versions) else None
        rows.append(row)
    return rows


_PER_PROCESS_FIELDS = ("median_ms", "timings", "speedup", "gb_per_s", "roofline_fraction")


class _QuietProgress:
    def describe(self, text):
        pass

    def update(self):
        pass

    def close(self):
        pass


class _TqdmProgress:
    def __init__(self, total):
        from tqdm.auto import tqdm
        self._bar = tqdm(total=total, unit="case", file=sys.stderr)

    def describe(self, text):
        self._bar.set_description(text)

    def update(self):
        self._bar.update()

    def close(self):
        self._bar.close()


def _progress_bar(total, enabled):
    if not enabled:
        return _QuietProgress()
    try:
        return _TqdmProgress(total)
    except ImportError:
        print("(install tqdm to see progress)", file=sys.stderr)
        return _QuietProgress()


def _usable_cpus():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _installed_version(distribution):
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# glibc's malloc returns large freed blocks to the OS, or keeps them, depending on what the process allocated
# before: by the run, every call's outputs then either reuse memory or fault in fresh pages.  In one process,
# torch's GroupNorm (1,512,64,64) channels-last training step took 0.88-2.7 ms from run to run, and 0.86-0.99 ms
# with freed memory kept.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LARGEST_MMAP_THRESHOLD = 32 * 2 ** 20   # glibc refuses more on 64-bit


def keep_freed_memory():
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse, instead of giving them back to the OS, so
    that every contender reuses its output memory in every run (and the comparison no longer depends on the
    allocator's history).  Returns whether it could: glibc only."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):   # no C library handle (Windows) or no mallopt (macOS)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # (musl has a mallopt that does nothing and returns 0)
    return bool(mallopt(_M_MMAP_THRESHOLD, _LARGEST_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def machine_info(threads, contenders=(), keeps_freed_memory=False):
    """The machine and software a run used."""
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for distribution in ("cynorm", "torch", "tensorflow", "tensorflow-cpu", "keras"):
        version = _installed_version(distribution)
        if version is not None:
            versions[distribution] = version
    return {
        "cpu": _cpu_model(), "machine": platform.machine(), "platform": platform.platform(),
        "logical_cpus": os.cpu_count(), "usable_cpus": _usable_cpus(), "threads": threads,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "keeps_freed_memory": keeps_freed_memory,
        "versions": versions,
        "contenders": {name: contender.description for name, contender in contenders.items()},
    }


def _format_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 10 else f"{ms:.1f}"


# The columns that name a case: operation, shape, layout and pass.
_CASE_COLUMNS = (
    ("operation", lambda row: row["operation"] + (f" G={row['num_groups']}" if row["num_groups"] else "")),
    ("shape", lambda row: _shape_text(row["shape"])),
    ("layout", lambda row: row["layout"]),
    ("pass", lambda row: _DIRECTION_LABELS[row["direction"]]),
)


def _speedup_header(key):
    faster, _, slower = key.partition(" vs ")
    return f"×{slower}" if faster == OURS else f"{faster} ×{slower}"


def _speedup_cell(row, key):
    if key not in row["speedup"]:
        return "-"
    spread = row.get("speedup_range", {}).get(key)
    return f"{row['speedup'][key]:.2f}" + ("" if spread is None else f" ({spread[0]:.2f}-{spread[1]:.2f})")


def _table_columns(rows, contender_names):
    """(header, cell function) pairs of the result table."""
    columns = list(_CASE_COLUMNS)
    for name in contender_names:
        columns.append((f"{name} ms", lambda row, name=name: _format_ms(row["median_ms"].get(name))))
    for key in dict.fromkeys(key for row in rows for key in row["speedup"]):
        columns.append((_speedup_header(key), lambda row, key=key: _speedup_cell(row, key)))
    columns.append(("GB/s", lambda row: "-" if row["gb_per_s"] is None else f"{row['gb_per_s']:.1f}"))
    columns.append(("roofline", lambda row: "-" if row["roofline_fraction"] is None
                    else f"{row['roofline_fraction']:.0%}"))
    return columns


def format_table(rows, contender_names, markdown=False):
    """The result rows as a text table (or a Markdown table for the README)."""
    columns = _table_columns(rows, contender_names)
    cells = [[header for header, _ in columns]] + [[cell(row) for _, cell in columns] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(line) + " |" for line in cells]
        lines.insert(1, "|" + "|".join("---" if i < len(_CASE_COLUMNS) else "---:" for i in range(len(columns))) + "|")
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(text.ljust(width) if i < len(_CASE_COLUMNS) else text.rjust(width)
                               for i, (text, width) in enumerate(zip(line, widths))) for line in cells)


_MEMORY_NOTE = {True: "malloc keeps freed blocks up to 32 MiB, so every contender reuses its output memory",
                False: "the allocator's defaults (outputs may fault in fresh pages on some runs and not others)"}


def format_machine(info):
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    contenders = "; ".join(f"{name}: {description}" for name, description in info["contenders"].items())
    return (f"CPU: {info['cpu']} ({info['machine']}), {info['logical_cpus']} logical CPUs, "
            f"{info['usable_cpus']} usable, {info['threads']} threads used\n"
            f"Platform: {info['platform']}\nVersions: {versions}\nContenders: {contenders}\n"
            f"Memory: {_MEMORY_NOTE[bool(info.get('keeps_freed_memory'))]}")


def plot(rows, path, title=""):
    """Save a PNG: speed-up of cynorm against each peer per case, and the fraction of the copy roofline."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [" ".join(cell(row) for _, cell in _CASE_COLUMNS) for row in rows]
    peers = sorted({key for row in rows for key in row["speedup"] if key.startswith(f"{OURS} vs ")})
    positions = np.arange(len(rows))
    figure = Figure(figsize=(13, 1.5 + 0.28 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    speedup_axes, roofline_axes = figure.subplots(1, 2, sharey=True)
    height = 0.8 / max(1, len(peers))
    for index, peer in enumerate(peers):
        values = [row["speedup"].get(peer, np.nan) for row in rows]
        speedup_axes.barh(positions + (index - (len(peers) - 1) / 2) * height, values, height=height,
                          label=peer.replace(f"{OURS} vs ", "vs "))
    speedup_axes.axvline(1.0, color="black", linewidth=0.8)
    speedup_axes.set_xscale("log")
    speedup_axes.set_xlabel("speed-up of cynorm (peer time / cynorm time, log scale)")
    speedup_axes.set_yticks(positions, labels, fontsize=8)
    speedup_axes.invert_yaxis()
    if peers:
        speedup_axes.legend(loc="best")
    fractions = [np.nan if row["roofline_fraction"] is None else row["roofline_fraction"] for row in rows]
    roofline_axes.barh(positions, fractions, color="tab:green")
    roofline_axes.axvline(1.0, color="black", linewidth=0.8)
    roofline_axes.set_xlabel("fraction of the copy roofline (1 = copy speed)")
    figure.suptitle(title, fontsize=9)
    figure.savefig(path, dpi=110)


def _parse_names(text, allowed, what):
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return names


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _argument_parser():
    parser = argparse.ArgumentParser(
        prog="cynorm bench",
        description="Time cynorm's normalization kernels against PyTorch and Keras on shapes from real models.")
    parser.add_argument("--ops", type=lambda text: _parse_names(text, OPERATIONS, "operation"), default=OPERATIONS,
                        help=f"comma-separated operations to run (default: all of {','.join(OPERATIONS)})")
    parser.add_argument("--quick", action="store_true", help="a subset of the table with fewer repeats (~1 min)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="threads for every contender (default: all usable cores)")
    parser.add_argument("--repeat", type=_positive_int, default=None,
                        help="timed samples per contender and case (default: 25, 7 with --quick)")
    parser.add_argument("--processes", type=_positive_int, default=1,
                        help="run the table in N fresh processes, one after the other, and report the median of "
                             "their medians, with the range of their speed-ups (default: 1, this process)")
    parser.add_argument("--dtype", choices=("float16", "float32", "float64"), default="float32")
    parser.add_argument("--peers", type=lambda text: _parse_names(text, PEERS, "peer"), default=DEFAULT_PEERS,
                        help=f"comma-separated peers (default: {','.join(DEFAULT_PEERS)}; "
                             f"available: {','.join(PEERS)}); missing ones are skipped")
    parser.add_argument("--json", metavar="PATH", help="write the machine and the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of the speed-ups and roofline fractions")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv=None, *, cases=None):
    """``cynorm bench [options]``: ``argv`` excludes the program and the ``bench`` command.

    ``cases`` replaces ``SHAPE_TABLE`` (the tests run a tiny table through the whole command).
    """
    parser = _argument_parser()
    args = parser.parse_args(argv)
    selected = [case for case in (SHAPE_TABLE if cases is None else cases)
                if case.operation in args.ops and (case.quick or not args.quick)]
    if not selected:
        parser.error("no case of the table matches --ops" + (" and --quick" if args.quick else ""))
    repeat = args.repeat or (7 if args.quick else 25)
    threads = args.threads or _usable_cpus()

    def say(message):
        print(message, file=sys.stderr, flush=True)

    contenders = _available_contenders((OURS, *args.peers, ROOFLINE), say)
    info = machine_info(threads, contenders, keeps_freed_memory=keep_freed_memory())
    print(format_machine(info), flush=True)
    if info["load_average_1min"] is not None and info["load_average_1min"] > 0.5:
        # A thread of a parallel call that loses its core stalls the whole call for a scheduler time slice.
        say(f"warning: the machine is busy (load average {info['load_average_1min']:.1f} on "
            f"{info['usable_cpus']} CPUs); timings will be noisy")
    if args.processes == 1:
        with cynorm.num_threads(threads):
            rows = run(selected, contenders, dtype=args.dtype, repeat=repeat, threads=threads,
                       progress=args.progress, say=say)
        medians, ratios = f"medians of {repeat} interleaved samples", "peer time / cynorm time"
    else:
        rows = combine_processes(_rows_in_fresh_processes(args.processes, selected, tuple(contenders), args.dtype,
                                                          repeat, threads, args.progress, say))
        medians = f"medians over {args.processes} processes of each one's median of {repeat} interleaved samples"
        ratios = "peer time / cynorm time, the median of the processes' (their range in brackets)"
    command = "cynorm bench " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{args.dtype}, {medians}, fwd+bwd = forward + backward (dx, dweight, dbias); × = {ratios}; "
          f"roofline = copy time scaled to the bytes moved / cynorm time\n")
    print(format_table(rows, list(contenders), markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as stream:
            json.dump({"command": command, "machine": info, "dtype": args.dtype, "repeat": repeat,
                       "processes": args.processes, "results": rows}, stream, indent=1)
        say(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, title=f"{command}\n{info['cpu']}, {threads} threads, {args.dtype}")
        say(f"wrote {args.plot}")
    return 0
