# The kernels compiled for x86-64-v4 CPUs (AVX-512); cynorm/_kernels.py picks the build to use.
include "_kernels.pxi"
