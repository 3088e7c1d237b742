# The kernels compiled for x86-64-v3 CPUs (AVX2, FMA); cynorm/_kernels.py picks the build to use.
include "_kernels.pxi"
