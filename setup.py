"""Builds the cynorm kernels: one Cython extension, compiled with -O3 and OpenMP when the compiler has it.

Environment switches:
  CYNORM_DEBUG=1   turn bounds, wraparound and initialization checks back on (slow; for debugging crashes)
  CYNORM_NATIVE=1  compile for the build machine's CPU (-march=native); the default runs on any CPU of the arch
  CYNORM_EMULATE_AVX512=1  build only the x86-64-v4 kernels, for x86-64-v3 CPUs, their AVX-512 intrinsics
                   emulated (tests/avx512_emulation.h): for testing that build's results where the CPU has no
                   AVX-512 (tests/test_builds.py builds it so, with --build-lib elsewhere)
"""
import os
import platform
import sys
import tempfile
import textwrap
import warnings

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("CYNORM_DEBUG", "0") == "1"
NATIVE = os.environ.get("CYNORM_NATIVE", "0") == "1"
EMULATE_AVX512 = os.environ.get("CYNORM_EMULATE_AVX512", "0") == "1"

# -ffp-contract=off: a fused multiply-add chosen in one inlined copy of a routine but not in another would
# make the row-parallel and chunk-parallel paths disagree in the last bit.  -fno-math-errno: sqrt need not set
# errno (never read), so the square roots of several rows' variances are taken in one vector instruction; the
# results are the same, correctly rounded (layer norm forward on rows of 4-32 values 1.15-1.32x).
COMPILE_ARGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"] + (["-march=native"] if NATIVE else [])
if DEBUG:
    COMPILE_ARGS = ["-O0", "-g"]
# GCC vectorizes a loop whose pointers may overlap behind a run-time check of each pair, but gives up (and runs
# the loop a value at a time) past ten pairs.  The rows backward adds four rows' parameter terms in one loop
# and needs more.  Added for GCC only; elsewhere the kernels add a row at a time.  Clang accepts the --param
# with a warning, and its vectorizer still declined such four-row loops: with them, a clang 14 build ran a
# channels-last GroupNorm forward on (16,1024,64) in 0.28 ms, against 0.14 ms a row at a time.  (The columns
# view's four-row sums now write to local arrays, which need no check.)
# -fno-ipa-cp-clone: GCC cloned backward_row for long_rows_backward's calls (sums only), and with two copies
# it stopped inlining gradient_sums into the row path: a layer norm backward on rows of 32 values 1.2x slower
# (neutral on the other kernels measured).
VECTORIZE_ARGS = ["--param=vect-max-version-for-alias-checks=64", "-DCYNORM_WIDE_ALIAS_CHECKS=1", "-fno-ipa-cp-clone"]
GCC_PROBE = textwrap.dedent("""
    #if !defined(__GNUC__) || defined(__clang__)
    #error "not GCC"
    #endif
    int main(void) { return 0; }
""")

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
}

OPENMP_PROBE = textwrap.dedent("""
    #include <omp.h>
    int main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }
""")


class BuildExtWithOpenMP(build_ext):
    """Adds OpenMP flags when the compiler accepts them; otherwise builds serial kernels and says so."""

    def build_extensions(self):
        openmp_flags = self._openmp_flags()
        if openmp_flags is None:
            warnings.warn("cynorm: the C compiler has no OpenMP support; building single-threaded kernels.")
            openmp_flags = []
        compile_args = COMPILE_ARGS if self.compiler.compiler_type != "msvc" else ["/O2"]
        if not DEBUG and self._compiles_and_links(VECTORIZE_ARGS, GCC_PROBE):
            compile_args = compile_args + VECTORIZE_ARGS
        for ext in list(self.extensions):
            level_flags = X86_64_LEVELS.get(ext.name.rsplit("_kernels_", 1)[-1], [])
            if level_flags and not self._compiles_and_links(level_flags, "int main(void) { return 0; }"):
                warnings.warn(f"cynorm: the C compiler does not accept {level_flags}; skipping {ext.name}.")
                self.extensions.remove(ext)
                continue
            ext.extra_compile_args = compile_args + level_flags + openmp_flags
            ext.extra_link_args = openmp_flags
        super().build_extensions()

    def _openmp_flags(self):
        candidates = [["/openmp"]] if self.compiler.compiler_type == "msvc" else [["-fopenmp"]]
        for flags in candidates:
            if self._compiles_and_links(flags, OPENMP_PROBE):
                return flags
        return None

    def _compiles_and_links(self, flags, program):
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "probe.c")
            with open(source, "w") as f:
                f.write(program)
            try:
                objects = self.compiler.compile([source], output_dir=tmp, extra_postargs=flags)
                self.compiler.link_executable(objects, "probe", output_dir=tmp, extra_postargs=flags)
            except Exception:  # any compiler or linker failure means "no OpenMP with these flags"
                return False
        return True


# One build of the kernels per x86-64 level, chosen at import time (cynorm/_kernels.py): a wheel runs
# everywhere and still uses AVX2 or AVX-512 where the CPU has them.
X86_64_LEVELS = {"x86_64_v3": ["-march=x86-64-v3"],
                 "x86_64_v4": ["-march=x86-64-v4", "-mprefer-vector-width=512"]}
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")

extensions = [Extension("cynorm._kernels_baseline", ["cynorm/_kernels_baseline.pyx"])]
if IS_X86_64 and not NATIVE and sys.platform != "win32":
    extensions += [Extension(f"cynorm._kernels_{level}", [f"cynorm/_kernels_{level}.pyx"]) for level in X86_64_LEVELS]
if EMULATE_AVX512:
    X86_64_LEVELS["x86_64_v4"] = ["-march=x86-64-v3", "-include",
                                  os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests",
                                               "avx512_emulation.h")]
    extensions = [ext for ext in extensions if ext.name == "cynorm._kernels_x86_64_v4"]

setup(
    packages=["cynorm", "cynorm.adapters"],
    package_dir={"cynorm": "cynorm", "cynorm.adapters": "adapters"},
    ext_modules=cythonize(extensions, compiler_directives=DIRECTIVES, annotate=False),
    cmdclass={"build_ext": BuildExtWithOpenMP},
    zip_safe=False,
)
