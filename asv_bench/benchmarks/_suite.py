"""Benchmark classes generated from cynorm's shape table: one class per operation and contender.

Each class times the contender's ``Runner`` from ``cynorm.benchmarks``, the same calls ``cynorm bench`` times:
``time_forward`` is inference, ``time_backward`` a training step (the forward that keeps the statistics, then
the gradients for x, weight and bias).  Parameter combinations that are not in the table, and peers that are not
installed, are skipped by raising ``NotImplementedError`` in ``setup``.
"""
from cynorm import benchmarks
from cynorm.benchmarks import CONTENDERS, OPERATIONS, SHAPE_TABLE, PeerUnavailable, find_case, make_workload

_CLASS_NAMES = {"group_norm": "GroupNorm", "instance_norm": "InstanceNorm", "layer_norm": "LayerNorm",
                "rms_norm": "RMSNorm"}


class _NormBenchmark:
    """Base of the generated classes; ``contender`` and ``operation`` are set by ``benchmark_classes``."""

    contender = None
    operation = None
    param_names = ["shape", "layout", "dtype", "threads"]
    # Keras traces its tf.function and the NumPy reference is slow on the large shapes.
    timeout = 300

    def setup(self, shape, layout, dtype, threads):
        case = find_case(self.operation, shape, layout)
        if case is None:
            raise NotImplementedError(f"{self.operation} {shape} {layout} is not in cynorm's shape table")
        benchmarks.keep_freed_memory()   # as `cynorm bench` does, for every contender alike
        contender = CONTENDERS[self.contender]
        try:
            contender.check()
            self.runner = contender.prepare(make_workload(case, dtype), threads)
        except PeerUnavailable as exc:
            raise NotImplementedError(str(exc)) from exc
        # Traces Keras's tf.function and writes every output page before anything is timed.
        self.runner.forward()
        self.runner.training_step()

    def time_forward(self, *params):
        self.runner.forward()

    def time_backward(self, *params):
        self.runner.training_step()

    def peakmem_forward(self, *params):
        self.runner.forward()


def _unique(values):
    return list(dict.fromkeys(values))


def benchmark_classes(contender, prefix, module, dtypes=("float32", "float64"), threads=(1, 2)):
    """``{class name: class}`` for every operation of the table, run by ``contender``.

    The caller puts the classes in its module namespace, where asv discovers them.
    """
    classes = {}
    for operation in OPERATIONS:
        cases = [case for case in SHAPE_TABLE if case.operation == operation]
        name = prefix + _CLASS_NAMES[operation]
        classes[name] = type(name, (_NormBenchmark,), {
            "__doc__": f"{operation} by {CONTENDERS[contender].description}.",
            "__module__": module,
            "contender": contender,
            "operation": operation,
            "params": [_unique(case.shape for case in cases), _unique(case.layout for case in cases),
                       list(dtypes), list(threads)],
        })
    return classes
