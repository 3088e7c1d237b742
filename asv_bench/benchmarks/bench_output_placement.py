"""Where the output starts in a cache line must not matter (streaming stores)."""
import cynorm
from cynorm.benchmarks import empty_past_cache_line, find_case, make_workload


class OutputPlacement:
    """A large output (y of the forward, dx of the backward) written with streaming stores, starting at several
    places in a 64-byte cache line.

    Every placement should take the same time.  With AVX2, an output 48 bytes past a line once ran 3.5x slower
    than the others (lines left part streamed, part written with ordinary stores), and channels-last outputs
    with rows of 320 channels 2x slower when not line-aligned (streamed blocks starting mid-line).
    """

    params = [[0, 16, 32, 48], ["channels_first", "channels_last"]]
    param_names = ["bytes_past_line", "layout"]
    shapes = {"channels_first": (8, 256, 56, 56), "channels_last": (2, 320, 64, 64)}

    def setup(self, bytes_past_line, layout):
        case = find_case("group_norm", self.shapes[layout], layout)
        self.workload = make_workload(case)
        self.out = empty_past_cache_line(self.workload.x.shape, self.workload.x.dtype, bytes_past_line)
        self.axis = case.axis
        _, self.mean, self.rstd = cynorm.group_norm(self.workload.x, 32, self.workload.weight, self.workload.bias,
                                                    axis=self.axis, out=self.out, return_stats=True)   # pages written

    def time_forward(self, bytes_past_line, layout):
        workload = self.workload
        cynorm.group_norm(workload.x, 32, workload.weight, workload.bias, axis=self.axis, out=self.out)

    def time_backward(self, bytes_past_line, layout):
        workload = self.workload
        cynorm.group_norm_backward(workload.dy, workload.x, self.mean, self.rstd, workload.weight, axis=self.axis,
                                   out=self.out)


class LayerNormOutputPlacement:
    """As OutputPlacement, for a layer norm over rows of 1024 values (16 MiB, streamed both ways): a row's last
    line is shared with the next row's first unless the output starts a line.  Through a copy per row, a
    backward 16 bytes past a line ran 1.2x slower than on an aligned output; the rows now carry that line to
    the next row (AVX-512 builds)."""

    params = [[0, 16, 32, 48]]
    param_names = ["bytes_past_line"]

    def setup(self, bytes_past_line):
        self.workload = make_workload(find_case("layer_norm", (8, 512, 1024), "last_axis"))
        self.out = empty_past_cache_line(self.workload.x.shape, self.workload.x.dtype, bytes_past_line)
        _, self.mean, self.rstd = cynorm.layer_norm(self.workload.x, self.workload.weight, self.workload.bias,
                                                    out=self.out, return_stats=True)   # pages written

    def time_forward(self, bytes_past_line):
        workload = self.workload
        cynorm.layer_norm(workload.x, workload.weight, workload.bias, out=self.out)

    def time_backward(self, bytes_past_line):
        workload = self.workload
        cynorm.layer_norm_backward(workload.dy, workload.x, self.mean, self.rstd, workload.weight, out=self.out)


class ArrayPlacement:
    """A GroupNorm forward of 8 MiB (in cache, not streamed) whose input and output both start the same number of
    bytes into a cache line, as NumPy's large arrays do (16 bytes).

    Every placement should take the same time: the kernels write the values before the output's first vector
    boundary apart and store the rest as whole vectors.  Run from the first value, the vectors of AVX-512 builds
    fell across line boundaries, and NumPy's arrays ran channels-first forwards 1.03-1.10x, channels-last ones
    1.17-1.23x slower than aligned ones.
    """

    params = [[0, 16, 48], ["channels_first", "channels_last"]]
    param_names = ["bytes_past_line", "layout"]

    def setup(self, bytes_past_line, layout):
        case = find_case("group_norm", (1, 512, 64, 64), layout)
        workload = make_workload(case)
        self.x = empty_past_cache_line(workload.x.shape, workload.x.dtype, bytes_past_line)
        self.x[...] = workload.x
        self.out = empty_past_cache_line(workload.x.shape, workload.x.dtype, bytes_past_line)
        self.weight, self.bias, self.axis = workload.weight, workload.bias, case.axis

    def time_forward(self, bytes_past_line, layout):
        cynorm.group_norm(self.x, 32, self.weight, self.bias, axis=self.axis, out=self.out)
