# The kernels compiled for any CPU of the architecture; cynorm/_kernels.py picks the build to use.
include "_kernels.pxi"
