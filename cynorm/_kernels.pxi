"""Normalization kernels: statistics, normalization and gradients on C-contiguous buffers.

This file is compiled once per instruction set (cynorm/_kernels_*.pyx include it); cynorm/_kernels.py
loads the build the CPU runs.

Every kernel sees its input through one of two views, chosen by the Python layer from the shape alone:

* rows:    x is (n_rows, length); each row is one normalization group, made of `chans_per_group` channels of
           `inner` consecutive elements (channels-first group/instance norm, layer/RMS norm over trailing axes).
* columns: x is (n_samples, n_rows, n_cols); a group is a run of consecutive columns of one sample, reduced
           over the rows (channels-last group/instance norm, layer/RMS norm over a middle axis).

Statistics are accumulated in fixed-size blocks whose boundaries depend on the shape only, and blocks are
merged in a fixed order: results do not depend on the thread count, on the schedule or on the batch size.
Within a block, a corrected two-pass (rough centre, then centred sums) keeps float32 sums accurate when
|mean| >> std; blocks are merged in float64 with Chan's pairwise formula.

The Python layer validates every argument: these functions run without bounds checks.  Every array is
passed by address (see `address_of`), C-contiguous, so that a caller holding them in another library's tensors
reaches them without making NumPy arrays first: the data, the parameters and their gradients in the compute
dtype (`float64` says which), the statistics in float64.
"""
from cython cimport floating
from cython.parallel cimport parallel, prange, threadid
from cpython.buffer cimport PyBUF_C_CONTIGUOUS, PyBuffer_Release, PyObject_GetBuffer
from libc.math cimport INFINITY, NAN, isfinite, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CYNORM_HAVE_OPENMP 1
    #else
    #define CYNORM_HAVE_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif

    /* float16 <-> float32 through the compiler's _Float16 (F16C instructions where the build has them). */
    #include <string.h>
    #if (defined(__clang__) && __clang_major__ >= 15) || \
        (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 12 && (defined(__x86_64__) || defined(__aarch64__)))
    #define CYNORM_HAVE_FLOAT16 1
    static inline float cynorm_half_to_float(unsigned short bits) {
        _Float16 value; memcpy(&value, &bits, sizeof value); return (float)value;
    }
    static inline unsigned short cynorm_float_to_half(float value) {
        _Float16 half = (_Float16)value; unsigned short bits; memcpy(&bits, &half, sizeof bits); return bits;
    }
    #else
    #define CYNORM_HAVE_FLOAT16 0
    static inline float cynorm_half_to_float(unsigned short bits) { (void)bits; return 0.0f; }
    static inline unsigned short cynorm_float_to_half(float value) { (void)value; return 0; }
    #endif
    /* The same on n values: eight at a time with F16C's instructions where the build has them (GCC 12 left a
       loop over the functions above a value at a time), the last few through a zero-padded vector, rounding to
       nearest even as NumPy does; one at a time elsewhere. */
    #if defined(__F16C__)
    #include <immintrin.h>
    static inline void cynorm_halves_to_floats(const unsigned short* bits, float* out, Py_ssize_t n) {
        Py_ssize_t i = 0;
        unsigned short rest[8] = {0};
        float widened[8];
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(bits + i))));
        if (i < n) {
            memcpy(rest, bits + i, (size_t)(n - i) * sizeof *rest);
            _mm256_storeu_ps(widened, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)rest)));
            memcpy(out + i, widened, (size_t)(n - i) * sizeof *widened);
        }
    }
    static inline void cynorm_floats_to_halves(const float* values, unsigned short* bits, Py_ssize_t n) {
        Py_ssize_t i = 0;
        float rest[8] = {0};
        unsigned short rounded[8];
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)(bits + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(values + i), _MM_FROUND_TO_NEAREST_INT));
        if (i < n) {
            memcpy(rest, values + i, (size_t)(n - i) * sizeof *rest);
            _mm_storeu_si128((__m128i*)rounded, _mm256_cvtps_ph(_mm256_loadu_ps(rest), _MM_FROUND_TO_NEAREST_INT));
            memcpy(bits + i, rounded, (size_t)(n - i) * sizeof *rounded);
        }
    }
    #else
    static inline void cynorm_halves_to_floats(const unsigned short* bits, float* out, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = cynorm_half_to_float(bits[i]);
    }
    static inline void cynorm_floats_to_halves(const float* values, unsigned short* bits, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) bits[i] = cynorm_float_to_half(values[i]);
    }
    #endif

    /* lanes_total's tree in GCC's and clang's vector types (see vector_lanes_total); other compilers use the
       scalar code. */
    #if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
    #define CYNORM_HAVE_VECTOR_TREES 1
    #define CYNORM_DEFINE_VECTOR_TREE(type)                                                                    \
        typedef type cynorm_##type##_16 __attribute__((vector_size(16 * sizeof(type)), aligned(sizeof(type)), \
                                                       may_alias));                                         \
        typedef type cynorm_##type##_8 __attribute__((vector_size(8 * sizeof(type))));                      \
        typedef type cynorm_##type##_4 __attribute__((vector_size(4 * sizeof(type))));                      \
        typedef type cynorm_##type##_2 __attribute__((vector_size(2 * sizeof(type))));                      \
        static inline double cynorm_lanes_total_##type(const type* lanes, type tail) {                     \
            cynorm_##type##_16 l16 = *(const cynorm_##type##_16*)lanes                                      \
                                     + *(const cynorm_##type##_16*)(lanes + 16);                            \
            cynorm_##type##_8 l8 = __builtin_shufflevector(l16, l16, 0, 1, 2, 3, 4, 5, 6, 7)                \
                                   + __builtin_shufflevector(l16, l16, 8, 9, 10, 11, 12, 13, 14, 15);       \
            cynorm_##type##_4 l4 = __builtin_shufflevector(l8, l8, 0, 1, 2, 3)                              \
                                   + __builtin_shufflevector(l8, l8, 4, 5, 6, 7);                           \
            cynorm_##type##_2 l2 = __builtin_shufflevector(l4, l4, 0, 1)                                    \
                                   + __builtin_shufflevector(l4, l4, 2, 3);                                 \
            return ((double)l2[0] + (double)l2[1]) + (double)tail;                                          \
        }
    #else
    #define CYNORM_HAVE_VECTOR_TREES 0
    #define CYNORM_DEFINE_VECTOR_TREE(type)                                                                    \
        static inline double cynorm_lanes_total_##type(const type* lanes, type tail) {                     \
            (void)lanes; (void)tail; return 0;                                                              \
        }
    #endif
    CYNORM_DEFINE_VECTOR_TREE(float)
    CYNORM_DEFINE_VECTOR_TREE(double)

    /* Streaming (non-temporal) stores: a large output is written to memory without first reading each
       destination line into the cache, and without evicting the input.  The values pass through a small
       buffer in L1, so the arithmetic stays in the Cython loops. */
    #include <stdint.h>
    #if defined(__SSE2__)
    #include <immintrin.h>
    #define CYNORM_HAVE_STREAM 1
    #else
    #define CYNORM_HAVE_STREAM 0
    #endif
    #if defined(__AVX512F__)
    #define CYNORM_STREAM_BYTES 64
    #define CYNORM_STREAM_FLOATS(dst, src) _mm512_stream_ps(dst, _mm512_loadu_ps(src))
    #define CYNORM_STREAM_DOUBLES(dst, src) _mm512_stream_pd(dst, _mm512_loadu_pd(src))
    #elif defined(__AVX__)
    #define CYNORM_STREAM_BYTES 32
    #define CYNORM_STREAM_FLOATS(dst, src) _mm256_stream_ps(dst, _mm256_loadu_ps(src))
    #define CYNORM_STREAM_DOUBLES(dst, src) _mm256_stream_pd(dst, _mm256_loadu_pd(src))
    #elif defined(__SSE2__)
    #define CYNORM_STREAM_BYTES 16
    #define CYNORM_STREAM_FLOATS(dst, src) _mm_stream_ps(dst, _mm_loadu_ps(src))
    #define CYNORM_STREAM_DOUBLES(dst, src) _mm_stream_pd(dst, _mm_loadu_pd(src))
    #endif
    /* Copies n values.  Only whole cache lines are streamed; the partial lines at either end get ordinary
       stores (an array whose values are not aligned to their size never reaches a line boundary, and is
       copied with ordinary stores).  A line must not be written partly by streaming stores and partly by
       ordinary ones: with AVX2's 32-byte stores, blocks starting 48 bytes into a line left such lines
       behind, and the whole call ran 3.5x slower than with ordinary stores. */
    #define CYNORM_LINE_BYTES 64
    static inline Py_ssize_t cynorm_values_past_line(const void* p, Py_ssize_t itemsize) {
        return (Py_ssize_t)(((uintptr_t)p % CYNORM_LINE_BYTES) / (uintptr_t)itemsize);
    }
    /* How many values from p to the next boundary of a vector of the build's width (0 on one). */
    #if CYNORM_HAVE_STREAM
    #define CYNORM_VECTOR_BYTES CYNORM_STREAM_BYTES
    #else
    #define CYNORM_VECTOR_BYTES 16
    #endif
    static inline Py_ssize_t cynorm_values_to_vector(const void* p, Py_ssize_t itemsize) {
        return (Py_ssize_t)(((CYNORM_VECTOR_BYTES - (uintptr_t)p % CYNORM_VECTOR_BYTES) % CYNORM_VECTOR_BYTES)
                            / (uintptr_t)itemsize);
    }
    #if CYNORM_HAVE_STREAM
    #define CYNORM_DEFINE_STREAM_COPY(name, type, stream)                                           \
        static inline void name(type* dst, const type* src, Py_ssize_t n) {                        \
            const Py_ssize_t width = CYNORM_STREAM_BYTES / sizeof(type);                           \
            const Py_ssize_t line = CYNORM_LINE_BYTES / sizeof(type);                              \
            Py_ssize_t i = 0, lines_end;                                                            \
            for (; i < n && ((uintptr_t)(dst + i) % CYNORM_LINE_BYTES) != 0; i++) dst[i] = src[i];    \
            lines_end = i + (n - i) / line * line;                                                  \
            for (; i < lines_end; i += width) stream(dst + i, src + i);                            \
            for (; i < n; i++) dst[i] = src[i];                                                     \
        }
    static inline void cynorm_store_fence(void) { _mm_sfence(); }
    #else
    #define CYNORM_DEFINE_STREAM_COPY(name, type, stream)                                           \
        static inline void name(type* dst, const type* src, Py_ssize_t n) {                        \
            memcpy(dst, src, (size_t)n * sizeof(type));                                             \
        }
    static inline void cynorm_store_fence(void) {}
    #endif
    CYNORM_DEFINE_STREAM_COPY(cynorm_stream_floats, float, CYNORM_STREAM_FLOATS)
    CYNORM_DEFINE_STREAM_COPY(cynorm_stream_doubles, double, CYNORM_STREAM_DOUBLES)
    /* The columns view's normalization of a tile, streamed: rows of `width` values, y = (x - mean_hi) * scale
       + shift with each column's constants, written a line of y at a time straight from the registers.  The
       constant arrays hold `width` values and then their first values again, a line's worth (as many as
       CYNORM_LINE_BYTES hold), so that a line across the end of a row takes its constants as vectors too.
       Only the partial lines at either end of the tile take ordinary stores.  (Through a buffer for every block,
       with a second load and store of each value, channels-last GroupNorm (8,3136,256) forwards ran 1.2x
       slower on a Zen 3; its normalization alone 1.35x.)  The same operations as normalize_tile_row, value by
       value: the same bits. */
    /* y = (x - mean_hi) * scale + shift, and dx = scale * dy + coef_x * (x - mean_hi) + coef_0 as
       input_gradient_tile_row computes it, of value i of a tile, in column col */
    #define CYNORM_NORMALIZED(i, col) ((x[i] - mean_hi[col]) * scale[col] + shift[col])
    #define CYNORM_INPUT_GRADIENT(i, col) (scale[col] * dy[i] + coef_x[col] * (x[i] - mean_hi[col]) + coef_0[col])
    #if CYNORM_HAVE_STREAM
    #if defined(__AVX512F__)
    #define CYNORM_STREAM_VECTOR_float(dst, v) _mm512_stream_ps(dst, (__m512)(v))
    #define CYNORM_STREAM_VECTOR_double(dst, v) _mm512_stream_pd(dst, (__m512d)(v))
    #elif defined(__AVX__)
    #define CYNORM_STREAM_VECTOR_float(dst, v) _mm256_stream_ps(dst, (__m256)(v))
    #define CYNORM_STREAM_VECTOR_double(dst, v) _mm256_stream_pd(dst, (__m256d)(v))
    #else
    #define CYNORM_STREAM_VECTOR_float(dst, v) _mm_stream_ps(dst, (__m128)(v))
    #define CYNORM_STREAM_VECTOR_double(dst, v) _mm_stream_pd(dst, (__m128d)(v))
    #endif
    /* Walks the `values` outputs `out` of a tile of rows of `width` values: the values before its first line and
       after its last with ordinary stores of VALUE(i, col), the whole lines between streamed as vectors of
       VECTOR(i, col) (value i of the tile, in column col). */
    #define CYNORM_STREAM_TILE(type, out, values, width, VALUE, VECTOR)                                         \
        const Py_ssize_t lanes = CYNORM_STREAM_BYTES / sizeof(type);                                            \
        const Py_ssize_t line = CYNORM_LINE_BYTES / sizeof(type);                                               \
        Py_ssize_t i = 0, col = 0, k, lines_end;                                                                \
        if ((uintptr_t)(out) % sizeof(type) == 0)                                                               \
            for (; i < (values) && (uintptr_t)((out) + i) % CYNORM_LINE_BYTES != 0; i++) {                      \
                (out)[i] = VALUE(i, col);                                                                       \
                if (++col == (width)) col = 0;                                                                  \
            }                                                                                                   \
        lines_end = (uintptr_t)(out) % sizeof(type) ? i : i + ((values) - i) / line * line;                     \
        for (; i < lines_end; i += line) {                                                                      \
            for (k = 0; k < line; k += lanes)                                                                   \
                CYNORM_STREAM_VECTOR_##type((out) + i + k, VECTOR(i + k, col + k));                             \
            for (col += line; col >= (width); col -= (width)) {}                                                \
        }                                                                                                       \
        for (; i < (values); i++) {                                                                             \
            (out)[i] = VALUE(i, col);                                                                           \
            if (++col == (width)) col = 0;                                                                      \
        }
    /* The same of a vector of values from value i, in columns from col */
    #define CYNORM_NORMALIZED_VECTOR(i, col) ((*(const vector*)(x + (i)) - *(const vector*)(mean_hi + (col)))  \
                                              * *(const vector*)(scale + (col)) + *(const vector*)(shift + (col)))
    #define CYNORM_INPUT_GRADIENT_VECTOR(i, col) (*(const vector*)(scale + (col)) * *(const vector*)(dy + (i))   \
        + *(const vector*)(coef_x + (col)) * (*(const vector*)(x + (i)) - *(const vector*)(mean_hi + (col)))   \
        + *(const vector*)(coef_0 + (col)))
    #define CYNORM_DEFINE_STREAM_NORMALIZE(type)                                                                \
        typedef type cynorm_stream_##type##_vector __attribute__((vector_size(CYNORM_STREAM_BYTES),             \
                                                                  aligned(sizeof(type)), may_alias));           \
        static void cynorm_normalize_tile_streamed_##type(const type* x, type* y, Py_ssize_t values,            \
                Py_ssize_t width, const type* mean_hi, const type* scale, const type* shift) {                  \
            typedef cynorm_stream_##type##_vector vector;                                                       \
            CYNORM_STREAM_TILE(type, y, values, width, CYNORM_NORMALIZED, CYNORM_NORMALIZED_VECTOR)             \
        }                                                                                                       \
        static void cynorm_input_gradient_tile_streamed_##type(const type* dy, const type* x, type* dx,         \
                Py_ssize_t values, Py_ssize_t width, const type* mean_hi, const type* scale,                    \
                const type* coef_x, const type* coef_0) {                                                       \
            typedef cynorm_stream_##type##_vector vector;                                                       \
            CYNORM_STREAM_TILE(type, dx, values, width, CYNORM_INPUT_GRADIENT, CYNORM_INPUT_GRADIENT_VECTOR)    \
        }
    #else   /* no streaming stores: the values one at a time */
    #define CYNORM_TILE_VALUES(out, values, width, VALUE)                                                       \
        Py_ssize_t i, col = 0;                                                                                  \
        for (i = 0; i < (values); i++) {                                                                        \
            (out)[i] = VALUE(i, col);                                                                           \
            if (++col == (width)) col = 0;                                                                      \
        }
    #define CYNORM_DEFINE_STREAM_NORMALIZE(type)                                                                \
        static void cynorm_normalize_tile_streamed_##type(const type* x, type* y, Py_ssize_t values,            \
                Py_ssize_t width, const type* mean_hi, const type* scale, const type* shift) {                  \
            CYNORM_TILE_VALUES(y, values, width, CYNORM_NORMALIZED)                                             \
        }                                                                                                       \
        static void cynorm_input_gradient_tile_streamed_##type(const type* dy, const type* x, type* dx,         \
                Py_ssize_t values, Py_ssize_t width, const type* mean_hi, const type* scale,                    \
                const type* coef_x, const type* coef_0) {                                                       \
            CYNORM_TILE_VALUES(dx, values, width, CYNORM_INPUT_GRADIENT)                                        \
        }
    #endif
    CYNORM_DEFINE_STREAM_NORMALIZE(float)
    CYNORM_DEFINE_STREAM_NORMALIZE(double)
    /* A thread's streamed output, taken piece by piece (a row's values, a block of them): the values of a line
       that a piece leaves unfinished wait in the writer, and if the next piece continues the output there,
       the line is streamed whole.  Through stream_copy, an output whose rows do not start lines (NumPy's large
       arrays start 16 bytes past one) had a line a row written with ordinary stores, and a layer norm backward
       on rows of 1024 values ran 1.2x slower than on an aligned output; carrying the line made it 1.2x faster,
       and one on rows of 16 values 1.5x.  Only the lines at either end of what a thread writes take ordinary
       stores.  The thread flushes its writer after its last piece, before the fence.  AVX-512 builds, where a
       line is one vector: the pieces of lines are moved with masked loads and stores (values a value at a time
       cost layer norm backwards on rows of 64-256 values 4-8 %).  Other builds write each piece as stream_copy
       does. */
    typedef struct {
        char* dst;            /* where the pending values go: the start of a line */
        Py_ssize_t count;     /* values pending, fewer than a line's */
        double pending[CYNORM_LINE_BYTES / sizeof(double)];
    } cynorm_stream_writer;
    static inline void cynorm_stream_writer_open(cynorm_stream_writer* writer) { writer->count = 0; }
    #define CYNORM_WRITER_BYTES ((Py_ssize_t)((sizeof(cynorm_stream_writer) + CYNORM_LINE_BYTES - 1) \
                                              / CYNORM_LINE_BYTES * CYNORM_LINE_BYTES))   /* a writer's lines */
    #if defined(__AVX512F__)
    /* vector, mask type, lanes, and the intrinsics' suffix: ps for float, pd for double */
    #define CYNORM_DEFINE_STREAM_WRITER(name, type, vector, mask_type, lanes, sfx)                            \
        static inline mask_type name##_lanes(Py_ssize_t first, Py_ssize_t count) {   /* [first, first+count) */ \
            return (mask_type)((((uint32_t)1 << count) - 1) << first);                                     \
        }                                                                                                  \
        static inline void name##_flush(cynorm_stream_writer* writer) {                                    \
            if (writer->count)                                                                             \
                _mm512_mask_storeu_##sfx((type*)writer->dst, name##_lanes(0, writer->count),               \
                                         _mm512_loadu_##sfx((const type*)writer->pending));                \
            writer->count = 0;                                                                             \
        }                                                                                                  \
        static inline void name##_put(cynorm_stream_writer* writer, type* dst, const type* src, Py_ssize_t n) { \
            Py_ssize_t i = 0, lines_end, head, take;                                                       \
            vector line;                                                                                   \
            mask_type mask;                                                                                \
            if (writer->count && (type*)writer->dst + writer->count != dst)                                \
                name##_flush(writer);                                                                      \
            if (writer->count) {   /* dst continues the pending line: its values go after them */          \
                take = n < lanes - writer->count ? n : lanes - writer->count;                              \
                mask = name##_lanes(writer->count, take);                                                  \
                /* (masked-off lanes are neither read nor faulted on) */                                   \
                line = _mm512_mask_loadu_##sfx(_mm512_loadu_##sfx((const type*)writer->pending), mask,     \
                                               src - writer->count);                                       \
                if (writer->count + take < lanes) {                                                        \
                    _mm512_storeu_##sfx((type*)writer->pending, line);                                     \
                    writer->count += take;                                                                 \
                    return;                                                                                \
                }                                                                                          \
                _mm512_stream_##sfx((type*)writer->dst, line);                                             \
                writer->count = 0;                                                                         \
                i = take;                                                                                  \
            } else if ((head = (Py_ssize_t)(((uintptr_t)dst % CYNORM_LINE_BYTES) / sizeof(type)))          \
                       && (uintptr_t)dst % sizeof(type) == 0) {                                            \
                /* the first line of a run, shared with values before it that are not this writer's */     \
                take = n < lanes - head ? n : lanes - head;                                                \
                mask = name##_lanes(head, take);                                                           \
                _mm512_mask_storeu_##sfx(dst - head, mask, _mm512_maskz_loadu_##sfx(mask, src - head));    \
                i = take;                                                                                  \
            } else if ((uintptr_t)dst % sizeof(type)) {   /* never on a line boundary */                   \
                memcpy(dst, src, (size_t)n * sizeof(type));                                                \
                return;                                                                                    \
            }                                                                                              \
            lines_end = i + (n - i) / lanes * lanes;                                                       \
            for (; i < lines_end; i += lanes) _mm512_stream_##sfx(dst + i, _mm512_loadu_##sfx(src + i));   \
            if (i < n) {                                                                                   \
                writer->dst = (char*)(dst + i);                                                            \
                writer->count = n - i;                                                                     \
                _mm512_storeu_##sfx((type*)writer->pending,                                                \
                                    _mm512_maskz_loadu_##sfx(name##_lanes(0, n - i), src + i));            \
            }                                                                                              \
        }
    CYNORM_DEFINE_STREAM_WRITER(cynorm_stream_writer_floats, float, __m512, __mmask16, 16, ps)
    CYNORM_DEFINE_STREAM_WRITER(cynorm_stream_writer_doubles, double, __m512d, __mmask8, 8, pd)
    #else
    #define CYNORM_DEFINE_STREAM_WRITER(name, type, copy)                                                     \
        static inline void name##_flush(cynorm_stream_writer* writer) { (void)writer; }                    \
        static inline void name##_put(cynorm_stream_writer* writer, type* dst, const type* src, Py_ssize_t n) { \
            (void)writer; copy(dst, src, n);                                                               \
        }
    CYNORM_DEFINE_STREAM_WRITER(cynorm_stream_writer_floats, float, cynorm_stream_floats)
    CYNORM_DEFINE_STREAM_WRITER(cynorm_stream_writer_doubles, double, cynorm_stream_doubles)
    #endif
    /* What a mean holds beyond mean_hi, its value rounded to float: mean - mean_hi - rest, with the rest rounded
       to float too, is the mean to about 48 bits.  The compiler must not see that mean_hi came from the mean:
       GCC 12.2 at -O3, vectorizing four rows' splits (SLP) inlined into a four-row kernel, made every rest 0
       (rows whose mean was near -3000 lost the fifth digit of their dx; the build tests caught it).  An empty
       asm hides it where the compiler takes one, a volatile round trip elsewhere. */
    static inline double cynorm_mean_beyond_float(double mean, float mean_hi) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __asm__("" : "+v"(mean_hi));
    #elif defined(__GNUC__) && defined(__aarch64__)
        __asm__("" : "+w"(mean_hi));
    #else
        volatile float hidden = mean_hi;
        mean_hi = hidden;
    #endif
        return mean - (double)mean_hi;
    }
    static inline float cynorm_mean_rest(double mean, float mean_hi) {
        return (float)cynorm_mean_beyond_float(mean, mean_hi);
    }
    /* Asks for the lines of [p, p + nbytes) to be brought into L2 (prefetcht1), without waiting for them: every
       line the range touches, so a range that does not start a line (NumPy's large arrays start 16 bytes into
       one) gets its last line too. */
    static inline void cynorm_prefetch_lines(const void* p, Py_ssize_t nbytes) {
    #if defined(__GNUC__)
        if (nbytes <= 0) return;
        const char* line = (const char*)((uintptr_t)p & ~(uintptr_t)(CYNORM_LINE_BYTES - 1));
        for (; line < (const char*)p + nbytes; line += CYNORM_LINE_BYTES) __builtin_prefetch(line, 0, 2);
    #else
        (void)p; (void)nbytes;
    #endif
    }

    /* Columns view, builds with AVX2 but not AVX-512: the per-column sums of a tile of wide rows that are not asked
       for ahead take eight rows at a time (see tile_moments_around).  Unmeasured with AVX-512. */
    #if defined(__AVX2__) && !defined(__AVX512F__)
    #define CYNORM_MOMENTS_EIGHT_ROWS 1
    #else
    #define CYNORM_MOMENTS_EIGHT_ROWS 0
    #endif

    /* Columns view, builds without AVX-512: the sums of wide rows asked for ahead take a row at a time (see
       ROW_AT_A_TIME_AHEAD_FROM_BYTES).  With AVX-512, whose strips take rows of up to 256 floats, a row at a time
       ran as fast as four on a Xeon VM (channels-last GroupNorm of 25-32 MiB, forwards and training steps). */
    #if !defined(__AVX512F__)
    #define CYNORM_ROWS_AHEAD_ONE_AT_A_TIME 1
    #else
    #define CYNORM_ROWS_AHEAD_ONE_AT_A_TIME 0
    #endif

    /* Columns view: per-column sums over the rows of a tile kept in registers, a strip of up to
       CYNORM_STRIP_VECTORS vectors of columns at a time, each column's sums added row after row (as the Cython
       loops add them: the same bits).  In GCC's and clang's vector types, for AVX-512 builds: an AVX2 build's
       strips (four 32-byte vectors, rows of up to 64 float32 values) ran 0.98-1.0x on the same machine.  Other
       builds' functions take no columns, and the Cython loops take them all.  Each returns how many columns it
       took: the whole vectors of them.  The first strip asks for the rows `ahead` rows ahead, up to row
       `readable_rows`. */
    #if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && defined(__AVX512F__)
    #define CYNORM_STRIP_BYTES 64
    #define CYNORM_STRIP_VECTORS 8
    /* Runs `strip` (on columns [col, col + vectors * lanes)) over strips of CYNORM_STRIP_VECTORS vectors, then
       at most one of 4, 2 and 1, `vectors` a constant in each (so each copy keeps its sums in registers, with
       no test per vector).  Rows of more than two full strips are left to the Cython loops: strips across a
       wide row read each row in pieces far apart, and channels-last GroupNorm on rows of 320 and 512 columns
       ran 2-5 % slower (256 columns 1.03-1.06x faster, 64-128 columns 1.10-1.15x). */
    #define CYNORM_FOR_STRIPS(columns, type, strip)                                                            \
        const Py_ssize_t lanes = CYNORM_STRIP_BYTES / sizeof(type);                                         \
        Py_ssize_t col = 0;                                                                                 \
        if ((columns) > 2 * CYNORM_STRIP_VECTORS * lanes)                                                   \
            return 0;                                                                                       \
        for (; col + CYNORM_STRIP_VECTORS * lanes <= (columns); col += CYNORM_STRIP_VECTORS * lanes) {      \
            const int vectors = CYNORM_STRIP_VECTORS; strip;                                                \
        }                                                                                                   \
        if (col + 4 * lanes <= (columns)) {                                                                 \
            const int vectors = 4; strip; col += 4 * lanes;                                                 \
        }                                                                                                   \
        if (col + 2 * lanes <= (columns)) {                                                                 \
            const int vectors = 2; strip; col += 2 * lanes;                                                 \
        }                                                                                                   \
        if (col + lanes <= (columns)) {                                                                     \
            const int vectors = 1; strip; col += lanes;                                                     \
        }                                                                                                   \
        return col;
    #define CYNORM_DEFINE_STRIPS(type)                                                                         \
        typedef type cynorm_##type##_vector __attribute__((vector_size(CYNORM_STRIP_BYTES),                 \
                                                           aligned(sizeof(type)), may_alias));              \
        typedef cynorm_##type##_vector cynorm_##type##_strip[CYNORM_STRIP_VECTORS];                         \
        static inline __attribute__((always_inline)) void cynorm_moments_strip_##type(                     \
                const type* x, Py_ssize_t rows, Py_ssize_t width, Py_ssize_t stride, Py_ssize_t readable_rows, \
                Py_ssize_t ahead, const type* centre, type* s1, type* s2, const int vectors) {              \
            const int lanes = CYNORM_STRIP_BYTES / sizeof(type);                                            \
            cynorm_##type##_strip c, a1, a2;                                                                \
            for (int v = 0; v < vectors; v++) {                                                             \
                c[v] = *(const cynorm_##type##_vector*)(centre + v * lanes);                                \
                a1[v] = a2[v] = (cynorm_##type##_vector){0};                                                \
            }                                                                                               \
            for (Py_ssize_t a = 0; a < rows; a++) {                                                         \
                if (a + ahead < readable_rows)                                                              \
                    cynorm_prefetch_lines(x + (a + ahead) * stride, width * sizeof(type));                  \
                for (int v = 0; v < vectors; v++) {                                                         \
                    cynorm_##type##_vector d = *(const cynorm_##type##_vector*)(x + a * stride + v * lanes)  \
                                               - c[v];                                                      \
                    a1[v] += d;                                                                             \
                    a2[v] += d * d;                                                                         \
                }                                                                                           \
            }                                                                                               \
            for (int v = 0; v < vectors; v++) {                                                             \
                *(cynorm_##type##_vector*)(s1 + v * lanes) = a1[v];                                         \
                *(cynorm_##type##_vector*)(s2 + v * lanes) = a2[v];                                         \
            }                                                                                               \
        }                                                                                                   \
        static inline __attribute__((always_inline)) void cynorm_gradient_strip_##type(                   \
                const type* dy, const type* x, Py_ssize_t rows, Py_ssize_t stride, Py_ssize_t readable_rows,  \
                Py_ssize_t ahead, const type* mean_hi, type* s1, type* s2, const int vectors) {             \
            const int lanes = CYNORM_STRIP_BYTES / sizeof(type);                                            \
            cynorm_##type##_strip m, a1, a2;                                                                \
            for (int v = 0; v < vectors; v++) {                                                             \
                m[v] = *(const cynorm_##type##_vector*)(mean_hi + v * lanes);                               \
                a1[v] = a2[v] = (cynorm_##type##_vector){0};                                                \
            }                                                                                               \
            for (Py_ssize_t a = 0; a < rows; a++) {                                                         \
                if (a + ahead < readable_rows) {                                                            \
                    cynorm_prefetch_lines(dy + (a + ahead) * stride, stride * sizeof(type));                \
                    cynorm_prefetch_lines(x + (a + ahead) * stride, stride * sizeof(type));                 \
                }                                                                                           \
                for (int v = 0; v < vectors; v++) {                                                         \
                    cynorm_##type##_vector g = *(const cynorm_##type##_vector*)(dy + a * stride + v * lanes);\
                    a1[v] += g;                                                                             \
                    a2[v] += g * (*(const cynorm_##type##_vector*)(x + a * stride + v * lanes) - m[v]);     \
                }                                                                                           \
            }                                                                                               \
            for (int v = 0; v < vectors; v++) {                                                             \
                *(cynorm_##type##_vector*)(s1 + v * lanes) = a1[v];                                         \
                *(cynorm_##type##_vector*)(s2 + v * lanes) = a2[v];                                         \
            }                                                                                               \
        }                                                                                                   \
        /* sums of x - centre and of its squares, over rows of `width` values `stride` apart */            \
        static Py_ssize_t cynorm_moments_strips_##type(const type* x, Py_ssize_t rows, Py_ssize_t width,    \
                Py_ssize_t stride, Py_ssize_t readable_rows, Py_ssize_t ahead, const type* centre, type* s1, \
                type* s2) {                                                                                 \
            CYNORM_FOR_STRIPS(width, type, cynorm_moments_strip_##type(                                     \
                x + col, rows, width, stride, col ? 0 : readable_rows, ahead, centre + col, s1 + col,       \
                s2 + col, vectors))                                                                         \
        }                                                                                                   \
        /* sums of dy and of dy * (x - mean_hi) */                                                         \
        static Py_ssize_t cynorm_gradient_strips_##type(const type* dy, const type* x, Py_ssize_t rows,     \
                Py_ssize_t stride, Py_ssize_t readable_rows, Py_ssize_t ahead, const type* mean_hi, type* s1, \
                type* s2) {                                                                                 \
            CYNORM_FOR_STRIPS(stride, type, cynorm_gradient_strip_##type(                                   \
                dy + col, x + col, rows, stride, col ? 0 : readable_rows, ahead, mean_hi + col, s1 + col,   \
                s2 + col, vectors))                                                                         \
        }
    #else
    #define CYNORM_DEFINE_STRIPS(type)                                                                         \
        static Py_ssize_t cynorm_moments_strips_##type(const type* x, Py_ssize_t rows, Py_ssize_t width,    \
                Py_ssize_t stride, Py_ssize_t readable_rows, Py_ssize_t ahead, const type* centre, type* s1, \
                type* s2) {                                                                                 \
            (void)x; (void)rows; (void)width; (void)stride; (void)readable_rows; (void)ahead; (void)centre; \
            (void)s1; (void)s2; return 0;                                                                   \
        }                                                                                                   \
        static Py_ssize_t cynorm_gradient_strips_##type(const type* dy, const type* x, Py_ssize_t rows,     \
                Py_ssize_t stride, Py_ssize_t readable_rows, Py_ssize_t ahead, const type* mean_hi, type* s1, \
                type* s2) {                                                                                 \
            (void)dy; (void)x; (void)rows; (void)stride; (void)readable_rows; (void)ahead; (void)mean_hi;   \
            (void)s1; (void)s2; return 0;                                                                   \
        }
    #endif
    CYNORM_DEFINE_STRIPS(float)
    CYNORM_DEFINE_STRIPS(double)

    /* Rows backward, one element per channel (layer and RMS norm), float rows of a multiple of 16 values: four
       rows at a time.  Each row's gradient sums are added in the same lanes and the same order as gradient_sums
       adds them (with vector_lanes_total's and tail_lanes_total's trees), and its coefficients, dx and
       parameter terms are computed with the operations of input_gradient_coefficients, input_gradient_values
       and add_parameter_terms: the same bits.  What changes is that the four rows' trees and coefficients are
       taken together, in vectors, where a row at a time spent most of a row of 32-128 values on them. */
    #include <math.h>
    #if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && (defined(__AVX512F__) || defined(__AVX2__))
    /* Pieces of the four-row kernels of AVX-512 and AVX2 builds. */
    typedef double cynorm_double_4 __attribute__((vector_size(32)));
    /* Four rows' statistics, k at k * stride (mean NULL: zeros), in the float parts the kernels take */
    static inline __attribute__((always_inline)) void cynorm_four_row_statistics(
            const double* mean, const double* rstd, Py_ssize_t stride,
            float mean_hi[4], float mean_lo[4], float rs[4]) {                      /* OUT */
        for (int k = 0; k < 4; k++) {
            double row_mean = mean ? mean[k * stride] : 0.0;
            mean_hi[k] = (float)row_mean;
            mean_lo[k] = cynorm_mean_rest(row_mean, mean_hi[k]);
            rs[k] = (float)rstd[k * stride];
        }
    }
    /* Four rows' dx coefficients from their gradient sums (k at k), the operations of input_gradient_coefficients
       (rstd k at k * stat_stride) */
    static inline __attribute__((always_inline)) void cynorm_four_coefficients(
            cynorm_double_4 sum_g, cynorm_double_4 sum_gx, const double* rstd, Py_ssize_t stat_stride,
            const float mean_lo[4], Py_ssize_t length, int centered,
            float coef_x_f[4], float coef_0_f[4]) {                                  /* OUT */
        cynorm_double_4 r = {rstd[0], rstd[stat_stride], rstd[2 * stat_stride], rstd[3 * stat_stride]};
        cynorm_double_4 lo = {(double)mean_lo[0], (double)mean_lo[1], (double)mean_lo[2], (double)mean_lo[3]};
        cynorm_double_4 k1 = centered ? sum_g / (double)length : (cynorm_double_4){0};
        cynorm_double_4 k2 = sum_gx / (double)length;
        cynorm_double_4 coef_x = ((-r) * r) * k2;
        cynorm_double_4 coef_0 = ((-r) * k1) + (((r * r) * k2) * lo);
        for (int k = 0; k < 4; k++) {
            coef_x_f[k] = (float)coef_x[k];
            coef_0_f[k] = (float)coef_0[k];
        }
    }
    /* The four-row forward kernels' statistics of one row from its centred sums t1 and t2, as moments_in_lanes
       and merge_moments compute them for a row of a single chunk and inverse_std its rstd (the same bits).
       Returns 1 where the row needs more than that (a centre far from its mean, or float sums that overflowed),
       for the caller to compute it again; else writes its mean and rstd and returns 0. */
    static inline int cynorm_single_chunk_statistics(double t1, double t2, float centre, Py_ssize_t length,
                                                     double eps, int centered, double* mean, double* rstd) {
        const double inverse_m = 1.0 / (double)length;
        double chunk_mean = 0, chunk_m2 = t2, total, delta, m2;
        if (centered) {
            if (t1 * t1 > 0.75 * (double)length * t2)
                return 1;
            chunk_mean = (double)centre + t1 * inverse_m;
            chunk_m2 = t2 - t1 * t1 * inverse_m;
            if (chunk_m2 < 0)
                chunk_m2 = 0;
        }
        if (!(isfinite(chunk_mean) && isfinite(chunk_m2)))
            return 1;
        total = 0.0 + (double)length;   /* merged into empty moments */
        delta = chunk_mean - 0.0;
        *mean = 0.0 + delta * ((double)length / total);
        m2 = 0.0 + (chunk_m2 + delta * delta * (0.0 * (double)length / total));
        *rstd = 1.0 / sqrt(m2 / (double)length + eps);
        return 0;
    }
    #endif
    #if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && defined(__AVX512F__)
    #define CYNORM_HAVE_ROW_QUADS 1
    #define CYNORM_HAVE_CHANNEL_QUADS 1
    /* Rows forward: the four-row kernel's longest rows, and the largest arrays it takes beyond rows of
       QUAD_STREAMED_ROW values (see rows_forward) */
    #define CYNORM_FORWARD_QUAD_ROW 1024
    #define CYNORM_FORWARD_QUAD_VALUES PY_SSIZE_T_MAX
    /* Rows backward: the longest rows the four rows' coefficients take together (see rows_backward) */
    #define CYNORM_BACKWARD_QUAD_ROW 1024
    typedef float cynorm_float_8 __attribute__((vector_size(32)));
    typedef float cynorm_float_8u __attribute__((vector_size(32), aligned(sizeof(float)), may_alias));
    typedef double cynorm_double_8 __attribute__((vector_size(64)));
    static inline __attribute__((always_inline)) cynorm_float_vector cynorm_broadcast_float(float value) {
        return (cynorm_float_vector)_mm512_set1_ps(value);
    }
    /* Two rows' 16 lanes each, a and b: [a's lanes j + (j + 8) | b's], lanes_total's step from 16 lanes to 8 */
    static inline __attribute__((always_inline)) cynorm_float_vector cynorm_pair_halves(
            cynorm_float_vector a, cynorm_float_vector b) {
        return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    /* Two rows' last 16 values, a and b: [0 + a's value j + value j + 8 | b's], gradient_sums' 8 tail lanes */
    static inline __attribute__((always_inline)) cynorm_float_vector cynorm_pair_tails(
            cynorm_float_vector a, cynorm_float_vector b) {
        return ((cynorm_float_vector){0}
                + __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23))
               + __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    /* Four rows' 8 lanes, two rows in each of a and b: each row's lanes j + (j + 4) */
    static inline __attribute__((always_inline)) cynorm_float_vector cynorm_pair_quarters(
            cynorm_float_vector a, cynorm_float_vector b) {
        return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    }
    /* Four rows' 4 lanes in a, four rows' in b: each row's lanes j + (j + 2), a's rows first */
    static inline __attribute__((always_inline)) cynorm_float_vector cynorm_pair_eighths(
            cynorm_float_vector a, cynorm_float_vector b) {
        return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
               + __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    }
    /* Eight pairs of lanes: each pair's first lane + its second, in float or in double */
    static inline __attribute__((always_inline)) cynorm_float_8 cynorm_pair_sums_float(cynorm_float_vector a) {
        return __builtin_shufflevector(a, a, 0, 2, 4, 6, 8, 10, 12, 14)
               + __builtin_shufflevector(a, a, 1, 3, 5, 7, 9, 11, 13, 15);
    }
    static inline __attribute__((always_inline)) cynorm_double_8 cynorm_pair_sums_double(cynorm_float_vector a) {
        return __builtin_convertvector(__builtin_shufflevector(a, a, 0, 2, 4, 6, 8, 10, 12, 14), cynorm_double_8)
               + __builtin_convertvector(__builtin_shufflevector(a, a, 1, 3, 5, 7, 9, 11, 13, 15), cynorm_double_8);
    }
    /* Four rows' two sums each, as lanes_total gives them: 32 float lanes a sum (s1, s2: two vectors a row, or
       none if `body` is 0) in the tree 32 -> 16 -> 8 -> 4 -> 2, the last pair in double, plus the 8-lane tails'
       totals ((q0 + q4) + (q2 + q6)) + ((q1 + q5) + (q3 + q7)) + rest, from tails_1 and tails_2 (two rows' 8
       lanes a vector).  Returns [the four rows' first sums | their second sums]. */
    static inline __attribute__((always_inline)) cynorm_double_8 cynorm_four_totals(
            cynorm_float_vector s1[4][2], cynorm_float_vector s2[4][2], Py_ssize_t body,
            const cynorm_float_vector tails_1[2], const cynorm_float_vector tails_2[2], cynorm_float_8 rest) {
        cynorm_float_8 tails = cynorm_pair_sums_float(cynorm_pair_eighths(
            cynorm_pair_quarters(tails_1[0], tails_1[1]), cynorm_pair_quarters(tails_2[0], tails_2[1]))) + rest;
        cynorm_double_8 totals = __builtin_convertvector(tails, cynorm_double_8);
        if (body > 0) {
            cynorm_float_vector l16[4], m16[4];
            for (int k = 0; k < 4; k++) {
                l16[k] = s1[k][0] + s1[k][1];
                m16[k] = s2[k][0] + s2[k][1];
            }
            totals = cynorm_pair_sums_double(cynorm_pair_eighths(
                cynorm_pair_quarters(cynorm_pair_halves(l16[0], l16[1]), cynorm_pair_halves(l16[2], l16[3])),
                cynorm_pair_quarters(cynorm_pair_halves(m16[0], m16[1]), cynorm_pair_halves(m16[2], m16[3]))))
                     + totals;
        }
        return totals;
    }
    /* Four rows' statistics in float parts and their dx coefficients (see cynorm_rows4_backward_float) */
    static inline __attribute__((always_inline)) void cynorm_rows4_coefficients_float(
            const float* dy, const float* x,                    /* rows k at k * row_stride */
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight,
            const double* mean, const double* rstd,            /* rows k at k * stat_stride; mean NULL: zeros */
            Py_ssize_t stat_stride, int centered,
            float mean_hi[4], float mean_lo[4], float rs_f[4], float coef_x_f[4], float coef_0_f[4]) {  /* OUT */
        const Py_ssize_t body = length - length % 32;           /* summed in 32 lanes, the 16 left in 8 */
        cynorm_float_vector mh[4], ml[4], rs[4], s1[4][2], s2[4][2], tail_g[2], tail_gx[2];
        cynorm_four_row_statistics(mean, rstd, stat_stride, mean_hi, mean_lo, rs_f);
        for (int k = 0; k < 4; k++) {
            mh[k] = cynorm_broadcast_float(mean_hi[k]);
            ml[k] = cynorm_broadcast_float(mean_lo[k]);
            rs[k] = cynorm_broadcast_float(rs_f[k]);
        }
        /* each row's g = weight * dy and g * xhat at i, 16 values */
        #define CYNORM_ROW_TERMS(k, i, g, gx)                                                                  \
            cynorm_float_vector g = *(const cynorm_float_vector*)(weight + (i))                               \
                                    * *(const cynorm_float_vector*)(dy + (k) * row_stride + (i));            \
            cynorm_float_vector gx = g * (((*(const cynorm_float_vector*)(x + (k) * row_stride + (i)) - mh[k]) \
                                           - ml[k]) * rs[k]);
        for (Py_ssize_t i = 0; i < body; i += 32) {   /* the first 32 values set the lanes */
            for (int h = 0; h < 2; h++) {
                for (int k = 0; k < 4; k++) {
                    CYNORM_ROW_TERMS(k, i + 16 * h, g, gx)
                    if (i) {
                        s1[k][h] += g;
                        s2[k][h] += gx;
                    } else {
                        s1[k][h] = g;
                        s2[k][h] = gx;
                    }
                }
            }
        }
        if (body < length) {   /* 8 lanes, each 0 + value j + value j + 8, two rows to a vector */
            for (int k = 0; k < 4; k += 2) {
                CYNORM_ROW_TERMS(k, body, g, gx)
                CYNORM_ROW_TERMS(k + 1, body, h, hx)
                tail_g[k / 2] = cynorm_pair_tails(g, h);
                tail_gx[k / 2] = cynorm_pair_tails(gx, hx);
            }
        } else {
            tail_g[0] = tail_g[1] = tail_gx[0] = tail_gx[1] = (cynorm_float_vector){0};
        }
        #undef CYNORM_ROW_TERMS
        /* (no values are left one by one: rest 0) */
        cynorm_double_8 sums = cynorm_four_totals(s1, s2, body, tail_g, tail_gx, (cynorm_float_8){0});
        sums = 0.0 + sums;   /* (each row's sums start from 0.0) */
        cynorm_four_coefficients(__builtin_shufflevector(sums, sums, 0, 1, 2, 3),
                                 __builtin_shufflevector(sums, sums, 4, 5, 6, 7), rstd, stat_stride, mean_lo, length,
                                 centered, coef_x_f, coef_0_f);
    }
    static inline void cynorm_rows4_backward_float(
            const float* dy, const float* x, float* dx,        /* rows k at k * row_stride */
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight,
            const double* mean, const double* rstd,            /* rows k at k * stat_stride; mean NULL: zeros */
            Py_ssize_t stat_stride, int centered, float* dweight_run, float* dbias_run,
            int stream) {                                       /* dx with streaming stores, a line each */
        cynorm_float_vector mh[4], ml[4], rs[4];
        float mean_hi[4], mean_lo[4], rs_f[4], coef_x[4], coef_0[4];
        cynorm_rows4_coefficients_float(dy, x, row_stride, length, weight, mean, rstd, stat_stride, centered,
                                        mean_hi, mean_lo, rs_f, coef_x, coef_0);
        for (int k = 0; k < 4; k++) {
            mh[k] = cynorm_broadcast_float(mean_hi[k]);
            ml[k] = cynorm_broadcast_float(mean_lo[k]);
            rs[k] = cynorm_broadcast_float(rs_f[k]);
        }
        for (int k = 0; k < 4; k++) {
            cynorm_float_vector cx = cynorm_broadcast_float(coef_x[k]);
            cynorm_float_vector c0 = cynorm_broadcast_float(coef_0[k]);
            for (Py_ssize_t i = 0; i < length; i += 16) {
                cynorm_float_vector w = *(const cynorm_float_vector*)(weight + i);
                cynorm_float_vector g = *(const cynorm_float_vector*)(dy + k * row_stride + i);
                cynorm_float_vector v = *(const cynorm_float_vector*)(x + k * row_stride + i);
                cynorm_float_vector value = (((rs[k] * w) * g) + (cx * (v - mh[k]))) + c0;
                if (stream)
                    _mm512_stream_ps(dx + k * row_stride + i, (__m512)value);
                else
                    *(cynorm_float_vector*)(dx + k * row_stride + i) = value;
            }
        }
        /* the parameter terms, row after row into each element's running sums */
        for (Py_ssize_t i = 0; i < length; i += 16) {
            cynorm_float_vector tw = *(cynorm_float_vector*)(dweight_run + i);
            cynorm_float_vector tb = *(cynorm_float_vector*)(dbias_run + i);
            for (int k = 0; k < 4; k++) {
                cynorm_float_vector g = *(const cynorm_float_vector*)(dy + k * row_stride + i);
                cynorm_float_vector v = *(const cynorm_float_vector*)(x + k * row_stride + i);
                tw = tw + g * (((v - mh[k]) - ml[k]) * rs[k]);
                tb = tb + g;
            }
            *(cynorm_float_vector*)(dweight_run + i) = tw;
            *(cynorm_float_vector*)(dbias_run + i) = tb;
        }
    }
    /* Rows backward, one element per channel, a float row of a multiple of 16 values: its dx and its terms of
       dweight and dbias, added into the running sums, in one pass, with the operations of input_gradient_values
       and add_row_range_terms (the same bits).  With `stream`, dx is written a line at a time with streaming
       stores: where the rows do not start lines, each line joins the end of one vector of values to the start
       of the next, and the values the row leaves in its last line wait in the thread's writer for its next row
       (see cynorm_stream_writer).  The lines of next_dy and next_x (NULL: none), a row the thread takes later,
       are asked for along the way.  backward_row had computed dx 256 values at a time into a buffer, copied it
       out through the writer, and added the terms in a loop of their own: with dy and x in L3, layer norm
       backward (4096,768) with a 64-byte aligned dx ran 1.43-1.48x faster this way, (4096,1024) 1.43x,
       (2048,2048) 1.24x; with every array 16 bytes into a line, 1.17x, (16384,256) 1.38x; from memory,
       1.06-1.12x. */
    static inline __attribute__((always_inline)) __m512 cynorm_input_gradient_vector_float(
            const float* dy, const float* x, const float* weight, float* dweight_run, float* dbias_run,
            const float* next_dy, const float* next_x, cynorm_float_vector r, cynorm_float_vector mh,
            cynorm_float_vector ml, cynorm_float_vector cx, cynorm_float_vector c0) {
        if (next_x) {
            __builtin_prefetch(next_dy, 0, 2);
            __builtin_prefetch(next_x, 0, 2);
        }
        cynorm_float_vector w = *(const cynorm_float_vector*)weight;
        cynorm_float_vector g = *(const cynorm_float_vector*)dy;
        cynorm_float_vector v = *(const cynorm_float_vector*)x;
        *(cynorm_float_vector*)dweight_run = *(cynorm_float_vector*)dweight_run + g * (((v - mh) - ml) * r);
        *(cynorm_float_vector*)dbias_run = *(cynorm_float_vector*)dbias_run + g;
        return (__m512)((((r * w) * g) + (cx * (v - mh))) + c0);
    }
    static inline void cynorm_row_input_gradient_float(
            const float* dy, const float* x, float* dx, Py_ssize_t length, const float* weight,
            float rs, float mean_hi, float mean_lo, float coef_x, float coef_0,
            float* dweight_run, float* dbias_run, int stream, cynorm_stream_writer* writer,
            const float* next_dy, const float* next_x) {
        const cynorm_float_vector r = cynorm_broadcast_float(rs), mh = cynorm_broadcast_float(mean_hi);
        const cynorm_float_vector ml = cynorm_broadcast_float(mean_lo), cx = cynorm_broadcast_float(coef_x);
        const cynorm_float_vector c0 = cynorm_broadcast_float(coef_0);
        /* dx's values before its first line boundary, and the lanes that pick a line out of two vectors */
        const int past = stream ? (int)cynorm_values_past_line(dx, sizeof(float)) : 0;
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i joined = _mm512_add_epi32(lane, _mm512_set1_epi32(16 - past));   /* a's last `past`, b */
        const __mmask16 before = (__mmask16)((1u << past) - 1);
        __m512 value, previous;
        Py_ssize_t i;
        #define CYNORM_NEXT_VALUE(i)                                                                           \
            cynorm_input_gradient_vector_float(dy + (i), x + (i), weight + (i), dweight_run + (i),             \
                                               dbias_run + (i), next_x ? next_dy + (i) : NULL,                  \
                                               next_x ? next_x + (i) : NULL,                                    \
                                               r, mh, ml, cx, c0)
        if (!stream) {
            for (i = 0; i < length; i += 16)
                _mm512_storeu_ps(dx + i, CYNORM_NEXT_VALUE(i));
        } else if (!past) {
            for (i = 0; i < length; i += 16)
                _mm512_stream_ps(dx + i, CYNORM_NEXT_VALUE(i));
        } else {
            previous = CYNORM_NEXT_VALUE(0);
            if (writer->count && (float*)writer->dst + writer->count == dx) {
                /* the line the thread's previous row left unfinished: its values, then this row's */
                _mm512_stream_ps(dx - past, _mm512_permutex2var_ps(_mm512_loadu_ps((const float*)writer->pending),
                                                                   _mm512_mask_blend_epi32(before, joined, lane),
                                                                   previous));
                writer->count = 0;
            } else {   /* the first line of a run, shared with values that are not the thread's: ordinary stores */
                cynorm_stream_writer_floats_flush(writer);
                _mm512_mask_storeu_ps(dx - past, (__mmask16)~before, _mm512_permutexvar_ps(joined, previous));
            }
            for (i = 16; i < length; i += 16) {
                value = CYNORM_NEXT_VALUE(i);
                _mm512_stream_ps(dx + i - past, _mm512_permutex2var_ps(previous, joined, value));
                previous = value;
            }
            /* the row's last values wait in the writer for the rest of their line */
            writer->dst = (char*)(dx + length - past);
            writer->count = past;
            _mm512_storeu_ps((float*)writer->pending, _mm512_permutexvar_ps(joined, previous));
        }
        #undef CYNORM_NEXT_VALUE
        if (next_x) {   /* (the last line, where the rows do not start lines) */
            cynorm_prefetch_lines(next_dy + length - 1, 1);
            cynorm_prefetch_lines(next_x + length - 1, 1);
        }
    }
    /* Rows backward, several elements per channel (channels-first group and instance norm): the gradient sums
       of four channels of `inner` < CHUNK values each, `stride` values from each other, each with its row's
       mean and rstd in float parts (mean_hi, mean_lo, rs), as gradient_sums computes them without a weight: the
       same adds in the same order, the four channels' trees taken together.  On small feature maps (7x7, 8x8)
       a channel's trees had cost more than its values. */
    static inline __attribute__((always_inline)) void cynorm_channels4_gradient_sums_float(
            const float* dy, const float* x, Py_ssize_t inner, Py_ssize_t stride,
            const float* mean_hi, const float* mean_lo, const float* rs,   /* (4,) each */
            double* sum_dy, double* sum_dy_xhat) {                      /* OUT (4,) each */
        const Py_ssize_t body = inner - inner % 32, tail_body = inner - inner % 8;
        cynorm_float_vector mh[4], ml[4], r[4];
        cynorm_float_8 mh8[4], ml8[4], r8[4];
        cynorm_float_vector s1[4][2], s2[4][2];
        cynorm_float_8 q1[4], q2[4];
        float rest1[4], rest2[4];
        for (int k = 0; k < 4; k++) {
            mh[k] = cynorm_broadcast_float(mean_hi[k]);
            ml[k] = cynorm_broadcast_float(mean_lo[k]);
            r[k] = cynorm_broadcast_float(rs[k]);
            mh8[k] = __builtin_shufflevector(mh[k], mh[k], 0, 1, 2, 3, 4, 5, 6, 7);
            ml8[k] = __builtin_shufflevector(ml[k], ml[k], 0, 1, 2, 3, 4, 5, 6, 7);
            r8[k] = __builtin_shufflevector(r[k], r[k], 0, 1, 2, 3, 4, 5, 6, 7);
        }
        for (int k = 0; k < 4; k++) {   /* the 8 tail lanes, then the values left one by one */
            const float* g = dy + k * stride;
            const float* v = x + k * stride;
            q1[k] = q2[k] = (cynorm_float_8){0};
            for (Py_ssize_t i = body; i < tail_body; i += 8) {
                cynorm_float_8 gi = *(const cynorm_float_8u*)(g + i);
                q1[k] += gi;
                q2[k] += gi * (((*(const cynorm_float_8u*)(v + i) - mh8[k]) - ml8[k]) * r8[k]);
            }
            rest1[k] = rest2[k] = 0.0f;
            for (Py_ssize_t i = tail_body; i < inner; i++) {
                rest1[k] += g[i];
                rest2[k] += g[i] * (((v[i] - mean_hi[k]) - mean_lo[k]) * rs[k]);
            }
        }
        for (Py_ssize_t i = 0; i < body; i += 32) {   /* the first 32 values set the lanes */
            for (int h = 0; h < 2; h++) {
                for (int k = 0; k < 4; k++) {
                    cynorm_float_vector g = *(const cynorm_float_vector*)(dy + k * stride + i + 16 * h);
                    cynorm_float_vector gx = g * (((*(const cynorm_float_vector*)(x + k * stride + i + 16 * h)
                                                    - mh[k]) - ml[k]) * r[k]);
                    if (i) {
                        s1[k][h] += g;
                        s2[k][h] += gx;
                    } else {
                        s1[k][h] = g;
                        s2[k][h] = gx;
                    }
                }
            }
        }
        /* tail_lanes_total's trees, four channels and both sums together, then + the values left */
        cynorm_float_vector pairs_1[2], pairs_2[2];
        for (int k = 0; k < 4; k += 2) {
            pairs_1[k / 2] = __builtin_shufflevector(q1[k], q1[k + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                                                     8, 9, 10, 11, 12, 13, 14, 15);
            pairs_2[k / 2] = __builtin_shufflevector(q2[k], q2[k + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                                                     8, 9, 10, 11, 12, 13, 14, 15);
        }
        cynorm_float_8 rest = {rest1[0], rest1[1], rest1[2], rest1[3], rest2[0], rest2[1], rest2[2], rest2[3]};
        cynorm_double_8 sums = cynorm_four_totals(s1, s2, body, pairs_1, pairs_2, rest);
        sums = 0.0 + sums;   /* (each channel's sums start from 0.0) */
        for (int k = 0; k < 4; k++) {
            sum_dy[k] = sums[k];
            sum_dy_xhat[k] = sums[4 + k];
        }
    }
    /* input_gradient_values for whole channels of `inner` values (several elements per channel): the same
       operations, a channel's last values under a mask, where GCC's loops started and ended every short
       channel (a third of a GroupNorm backward on 7x7 maps). */
    static void cynorm_channels_input_gradient_float(const float* dy, const float* x, float* dx,
            Py_ssize_t inner, Py_ssize_t channels, const float* weight,   /* the channels' weights */
            double rstd, float mean_hi, float coef_x, float coef_0) {
        const __m512 mh = _mm512_set1_ps(mean_hi), cx = _mm512_set1_ps(coef_x), c0 = _mm512_set1_ps(coef_0);
        const __mmask16 last = (__mmask16)((1u << (inner % 16)) - 1u);
        const Py_ssize_t whole = inner - inner % 16;
        for (Py_ssize_t c = 0; c < channels; c++) {
            const __m512 scale = _mm512_set1_ps((float)(rstd * (double)weight[c]));
            const float* g = dy + c * inner;
            const float* v = x + c * inner;
            float* out = dx + c * inner;
            Py_ssize_t i = 0;
            for (; i < whole; i += 16) {
                __m512 t = _mm512_add_ps(_mm512_mul_ps(scale, _mm512_loadu_ps(g + i)),
                                         _mm512_mul_ps(cx, _mm512_sub_ps(_mm512_loadu_ps(v + i), mh)));
                _mm512_storeu_ps(out + i, _mm512_add_ps(t, c0));
            }
            if (last) {
                __m512 t = _mm512_add_ps(_mm512_mul_ps(scale, _mm512_maskz_loadu_ps(last, g + i)),
                                         _mm512_mul_ps(cx, _mm512_sub_ps(_mm512_maskz_loadu_ps(last, v + i), mh)));
                _mm512_mask_storeu_ps(out + i, last, _mm512_add_ps(t, c0));
            }
        }
    }
    /* Rows forward, float rows of a multiple of 16 values, one element per channel (layer and RMS norm): four
       rows at a time, each row's statistics computed with the operations of row_moments on a single chunk
       (head_mean's centre, centred_sums' lanes and trees, moments_in_lanes, merge_moments) and its values
       with those of normalize_values: the same bits, the rows' lane trees taken together.  Returns a bit for
       each row whose statistics need more than that (a centre far from the mean, or float sums that
       overflowed): the caller computes those rows again, one at a time. */
    static inline int cynorm_rows4_forward_float(const float* x, float* y,   /* rows k at k * length */
            Py_ssize_t length, const float* weight, const float* bias, double eps, int centered,
            double* mean, double* rstd,                                     /* OUT rows k at k */
            const float* next_x) {              /* the next four rows, prefetched meanwhile, or NULL */
        const Py_ssize_t body = length - length % 32;
        cynorm_float_vector c[4], s1[4][2], s2[4][2], tail_1[2], tail_2[2];
        float centre[4];
        int refused = 0;
        for (int k = 0; k < 4; k++) {   /* head_mean: the first 32 values in 8 double lanes */
            centre[k] = 0.0f;
            if (centered) {
                cynorm_double_8 lanes = (cynorm_double_8){0};
                for (int step = 0; step < 4; step++)
                    lanes += __builtin_convertvector(*(const cynorm_float_8u*)(x + k * length + 8 * step),
                                                     cynorm_double_8);
                centre[k] = (float)(((((lanes[0] + lanes[4]) + (lanes[2] + lanes[6]))
                                      + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))) + 0.0) * (1.0 / 32));
            }
            c[k] = cynorm_broadcast_float(centre[k]);
        }
        for (Py_ssize_t i = 0; i < body; i += 32) {   /* the first 32 values set the lanes */
            for (int h = 0; h < 2; h++) {
                for (int k = 0; k < 4; k++) {
                    cynorm_float_vector d = *(const cynorm_float_vector*)(x + k * length + i + 16 * h) - c[k];
                    if (i) {
                        s1[k][h] += d;
                        s2[k][h] += d * d;
                    } else {
                        s1[k][h] = d;
                        s2[k][h] = d * d;
                    }
                }
            }
        }
        if (body < length) {
            for (int k = 0; k < 4; k += 2) {
                cynorm_float_vector d = *(const cynorm_float_vector*)(x + k * length + body) - c[k];
                cynorm_float_vector e = *(const cynorm_float_vector*)(x + (k + 1) * length + body) - c[k + 1];
                tail_1[k / 2] = cynorm_pair_tails(d, e);
                tail_2[k / 2] = cynorm_pair_tails(d * d, e * e);
            }
        } else {
            tail_1[0] = tail_1[1] = tail_2[0] = tail_2[1] = (cynorm_float_vector){0};
        }
        cynorm_double_8 sums = cynorm_four_totals(s1, s2, body, tail_1, tail_2, (cynorm_float_8){0});
        for (int k = 0; k < 4; k++) {
            if (cynorm_single_chunk_statistics(sums[k], sums[4 + k], centre[k], length, eps, centered, &mean[k],
                                               &rstd[k])) {
                refused |= 1 << k;
                continue;
            }
            {
                float mean_hi = (float)mean[k];
                cynorm_float_vector mh = cynorm_broadcast_float(mean_hi);
                cynorm_float_vector ml = cynorm_broadcast_float(cynorm_mean_rest(mean[k], mean_hi));
                cynorm_float_vector rs = cynorm_broadcast_float((float)rstd[k]);
                if (next_x)   /* the line of the row's last value, which a row that does not start a line adds */
                    __builtin_prefetch(next_x + (k + 1) * length - 1, 0, 3);
                for (Py_ssize_t i = 0; i < length; i += 16) {
                    cynorm_float_vector v = *(const cynorm_float_vector*)(x + k * length + i);
                    if (next_x)   /* (a line for each line written: the memory keeps busy) */
                        __builtin_prefetch(next_x + k * length + i, 0, 3);
                    *(cynorm_float_vector*)(y + k * length + i) =
                        ((((v - mh) - ml) * rs) * *(const cynorm_float_vector*)(weight + i))
                        + *(const cynorm_float_vector*)(bias + i);
                }
            }
        }
        return refused;
    }
    /* Four rows' sums of lanes_sums' kind, a row in each of r0-r3: each row's four partial sums (value j into
       partial j % 4, from 0) are its 128-bit quarters added in order, then (partial 0 + 2) + (1 + 3).  Row k's
       total is lane 4k. */
    static inline __m512 cynorm_quarters_totals(__m512 r0, __m512 r1, __m512 r2, __m512 r3) {
        const __m512 t0 = _mm512_shuffle_f32x4(r0, r1, 0x44), t1 = _mm512_shuffle_f32x4(r0, r1, 0xEE);
        const __m512 t2 = _mm512_shuffle_f32x4(r2, r3, 0x44), t3 = _mm512_shuffle_f32x4(r2, r3, 0xEE);
        __m512 p = _mm512_add_ps(_mm512_setzero_ps(), _mm512_shuffle_f32x4(t0, t2, 0x88));   /* quarters 0 */
        p = _mm512_add_ps(p, _mm512_shuffle_f32x4(t0, t2, 0xDD));
        p = _mm512_add_ps(p, _mm512_shuffle_f32x4(t1, t3, 0x88));
        p = _mm512_add_ps(p, _mm512_shuffle_f32x4(t1, t3, 0xDD));
        p = _mm512_add_ps(p, _mm512_permute_ps(p, 0x4E));   /* lanes 0 + 2 and 1 + 3 */
        return _mm512_add_ps(p, _mm512_permute_ps(p, 0xB1));
    }
    /* partial[0:16] += run's 16 floats, each in double */
    static inline void cynorm_add_doubled(double* partial, __m512 run) {
        const __m512d low = _mm512_cvtps_pd(_mm512_castps512_ps256(run));
        const __m512d high = _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_shuffle_f32x4(run, run, 0xEE)));
        _mm512_storeu_pd(partial, _mm512_add_pd(_mm512_loadu_pd(partial), low));
        _mm512_storeu_pd(partial + 8, _mm512_add_pd(_mm512_loadu_pd(partial + 8), high));
    }
    /* short_rows_backward for 16 (ROW_BLOCK) rows of 16 float values, one element per channel, with a row in
       each vector where it puts a row in each lane: the same operations in the same order, so the same bits,
       without the moves into and out of lanes.  mean_hi, mean_lo, rs are the rows' split statistics; dx goes
       to out (row k at k * out_stride); each four rows' parameter terms are added row after row into the
       running sums, which are flushed into the partials after rows 8 and 16, as add_parameter_terms and
       flush_parameter_terms do. */
    static inline void cynorm_rows16_backward_float(const float* dy, const float* x,   /* rows k at k * row_stride */
            float* out, Py_ssize_t row_stride, Py_ssize_t out_stride, const float* weight,
            const float* mean_hi, const float* mean_lo, const float* rs,                      /* (16,) each */
            const double* rstd, Py_ssize_t stat_stride, int centered,
            float* dweight_run, float* dbias_run, double* dweight_partial, double* dbias_partial) {  /* (16,) */
        const __m512 w = _mm512_loadu_ps(weight);
        __m512 weight_run = _mm512_loadu_ps(dweight_run), bias_run = _mm512_loadu_ps(dbias_run);
        for (int quad = 0; quad < 4; quad++) {
            __m512 g[4], g_xhat[4], d[4], v[4];
            float s1[16], s2[16];
            for (int k = 0; k < 4; k++) {
                const int r = 4 * quad + k;
                d[k] = _mm512_loadu_ps(dy + r * row_stride);
                v[k] = _mm512_loadu_ps(x + r * row_stride);
                const __m512 xhat = _mm512_mul_ps(_mm512_sub_ps(_mm512_sub_ps(v[k], _mm512_set1_ps(mean_hi[r])),
                                                                _mm512_set1_ps(mean_lo[r])), _mm512_set1_ps(rs[r]));
                g[k] = _mm512_mul_ps(w, d[k]);
                g_xhat[k] = _mm512_mul_ps(g[k], xhat);
                weight_run = _mm512_add_ps(weight_run, _mm512_mul_ps(d[k], xhat));
                bias_run = _mm512_add_ps(bias_run, d[k]);
            }
            _mm512_storeu_ps(s1, cynorm_quarters_totals(g[0], g[1], g[2], g[3]));
            _mm512_storeu_ps(s2, cynorm_quarters_totals(g_xhat[0], g_xhat[1], g_xhat[2], g_xhat[3]));
            for (int k = 0; k < 4; k++) {   /* input_gradient_coefficients' arithmetic, then dx */
                const int r = 4 * quad + k;
                const double row_rstd = rstd[r * stat_stride];
                const double k1 = centered ? (double)s1[4 * k] / 16.0 : 0.0;
                const double k2 = (double)s2[4 * k] / 16.0;
                const float coef_x = (float)((-row_rstd * row_rstd) * k2);
                const float coef_0 = (float)((-row_rstd * k1) + ((row_rstd * row_rstd) * k2) * (double)mean_lo[r]);
                const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(rs[r]), w), d[k]);
                const __m512 centred = _mm512_mul_ps(_mm512_set1_ps(coef_x),
                                                     _mm512_sub_ps(v[k], _mm512_set1_ps(mean_hi[r])));
                _mm512_storeu_ps(out + r * out_stride,
                                 _mm512_add_ps(_mm512_add_ps(scaled, centred), _mm512_set1_ps(coef_0)));
            }
            if (quad % 2 == 1) {   /* after every ROWS_PER_FLUSH (8) rows */
                cynorm_add_doubled(dweight_partial, weight_run);
                cynorm_add_doubled(dbias_partial, bias_run);
                weight_run = _mm512_setzero_ps();
                bias_run = _mm512_setzero_ps();
            }
        }
        _mm512_storeu_ps(dweight_run, weight_run);
        _mm512_storeu_ps(dbias_run, bias_run);
    }
    #define CYNORM_HAVE_ROW_LOOP 1
    #define CYNORM_ROW_LOOP_JOINS_LINES 1
    #define CYNORM_NORMALIZE_ROW_QUADS 1
    #else
    #define CYNORM_HAVE_ROW_QUADS 0
    #define CYNORM_NORMALIZE_ROW_QUADS 0
    #if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && defined(__AVX2__)
    /* AVX2 builds: the one-row loop of the AVX-512 builds in 8-value vectors, the same operations in the same
       order (the same bits).  dx streams only where it starts a line (every row then starts one): the others
       go through the stream writer (see backward_row).  Layer norm training steps through the PyTorch adapter
       on a Zen 3, A/B: (4096,768) 1.10-1.13x, (8,512,1024) 1.12x, (16384,256) 1.12x, (2048,2048) 1.16x; in cache
       (1024,768) 1.01x. */
    #define CYNORM_HAVE_ROW_LOOP 1
    #define CYNORM_ROW_LOOP_JOINS_LINES 0
    typedef float cynorm_float_8 __attribute__((vector_size(32)));
    typedef float cynorm_float_8u __attribute__((vector_size(32), aligned(sizeof(float)), may_alias));
    static inline void cynorm_row_input_gradient_float(
            const float* dy, const float* x, float* dx, Py_ssize_t length, const float* weight,
            float rs, float mean_hi, float mean_lo, float coef_x, float coef_0,
            float* dweight_run, float* dbias_run, int stream, cynorm_stream_writer* writer,
            const float* next_dy, const float* next_x) {
        typedef float vector __attribute__((vector_size(32)));
        const vector r = (vector)_mm256_set1_ps(rs), mh = (vector)_mm256_set1_ps(mean_hi);
        const vector ml = (vector)_mm256_set1_ps(mean_lo), cx = (vector)_mm256_set1_ps(coef_x);
        const vector c0 = (vector)_mm256_set1_ps(coef_0);
        (void)writer;
        for (Py_ssize_t i = 0; i < length; i += 16) {   /* a line of each array per step */
            if (next_x) {
                __builtin_prefetch(next_dy + i, 0, 2);
                __builtin_prefetch(next_x + i, 0, 2);
            }
            for (int h = 0; h < 16; h += 8) {
                vector w = *(const cynorm_float_8u*)(weight + i + h);
                vector g = *(const cynorm_float_8u*)(dy + i + h);
                vector v = *(const cynorm_float_8u*)(x + i + h);
                *(cynorm_float_8u*)(dweight_run + i + h) = *(cynorm_float_8u*)(dweight_run + i + h)
                                                           + g * (((v - mh) - ml) * r);
                *(cynorm_float_8u*)(dbias_run + i + h) = *(cynorm_float_8u*)(dbias_run + i + h) + g;
                vector value = (((r * w) * g) + (cx * (v - mh))) + c0;
                if (stream)
                    _mm256_stream_ps(dx + i + h, (__m256)value);
                else
                    *(cynorm_float_8u*)(dx + i + h) = value;
            }
        }
        if (next_x) {   /* (the last line, where the rows do not start lines) */
            cynorm_prefetch_lines(next_dy + length - 1, 1);
            cynorm_prefetch_lines(next_x + length - 1, 1);
        }
    }
    /* A row's two sums in 8-value vectors, as the four-row kernels take them: over its first `body` values in
       32 lanes, the first 32 values setting them, added down to 8 as lanes_total's first two steps do (zeros if
       `body` is 0), and over its values from `body` to `tail_end` in 8 tail lanes from 0.  The terms at i are
       centred_sums' d = x - a and d * d (kind CYNORM_CENTRED), or gradient_sums' g and g * xhat with
       xhat = ((x - a) - b) * r and g = weight * dy (CYNORM_WEIGHTED) or dy (CYNORM_UNWEIGHTED).  `kind` is a
       constant at every call, so each inlined copy keeps one kind of terms. */
    enum { CYNORM_CENTRED, CYNORM_WEIGHTED, CYNORM_UNWEIGHTED };
    static inline __attribute__((always_inline)) void cynorm_row_lanes_8(
            int kind, const float* x, const float* dy, const float* weight, Py_ssize_t body, Py_ssize_t tail_end,
            cynorm_float_8 a, cynorm_float_8 b, cynorm_float_8 r,
            cynorm_float_8* lanes_1, cynorm_float_8* lanes_2, cynorm_float_8* tails_1, cynorm_float_8* tails_2) {
        cynorm_float_8 s1[4], s2[4];
        #define CYNORM_TERMS_AT(i, t1, t2)                                                                     \
            cynorm_float_8 t1, t2;                                                                            \
            if (kind == CYNORM_CENTRED) {                                                                     \
                t1 = *(const cynorm_float_8u*)(x + (i)) - a;                                                  \
                t2 = t1 * t1;                                                                                 \
            } else {                                                                                          \
                t1 = *(const cynorm_float_8u*)(dy + (i));                                                     \
                if (kind == CYNORM_WEIGHTED)                                                                  \
                    t1 = *(const cynorm_float_8u*)(weight + (i)) * t1;                                        \
                t2 = t1 * (((*(const cynorm_float_8u*)(x + (i)) - a) - b) * r);                               \
            }
        *lanes_1 = *lanes_2 = (cynorm_float_8){0};
        if (body > 0) {
            for (int h = 0; h < 4; h++) {
                CYNORM_TERMS_AT(8 * h, t1, t2)
                s1[h] = t1;
                s2[h] = t2;
            }
            for (Py_ssize_t i = 32; i < body; i += 32) {
                for (int h = 0; h < 4; h++) {
                    CYNORM_TERMS_AT(i + 8 * h, t1, t2)
                    s1[h] += t1;
                    s2[h] += t2;
                }
            }
            *lanes_1 = (s1[0] + s1[2]) + (s1[1] + s1[3]);   /* lanes j += j + 16, then j += j + 8 */
            *lanes_2 = (s2[0] + s2[2]) + (s2[1] + s2[3]);
        }
        *tails_1 = *tails_2 = (cynorm_float_8){0};
        for (Py_ssize_t i = body; i < tail_end; i += 8) {
            CYNORM_TERMS_AT(i, t1, t2)
            *tails_1 += t1;
            *tails_2 += t2;
        }
        #undef CYNORM_TERMS_AT
    }
    /* The ends of four rows' two lane trees, rows k and k + 1 in one vector: lanes_total's from its third step,
       on each row's 32 lanes already added down to 8 (lanes_1, lanes_2; none if `body` is 0), and
       tail_lanes_total's on its 8 tail lanes (tails_1, tails_2) with the values left one by one (rest[k],
       rest[4 + k]); totals[k] and totals[4 + k] are row k's two sums. */
    static inline __attribute__((always_inline)) void cynorm_four_rows_totals_8(
            const cynorm_float_8 lanes_1[4], const cynorm_float_8 lanes_2[4],
            const cynorm_float_8 tails_1[4], const cynorm_float_8 tails_2[4], Py_ssize_t body, const float rest[8],
            double totals[8]) {                                                                     /* OUT */
        cynorm_float_8 halves[4], tail_halves[4];   /* lanes j += j + 4 (lanes_total), the tails' q_j + q_(j+4) */
        #define CYNORM_ROW_PAIR_HALVES(a, b) (__builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11) \
                                              + __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15))
        for (int k = 0; k < 4; k += 2) {
            halves[k / 2] = CYNORM_ROW_PAIR_HALVES(lanes_1[k], lanes_1[k + 1]);
            halves[2 + k / 2] = CYNORM_ROW_PAIR_HALVES(lanes_2[k], lanes_2[k + 1]);
            tail_halves[k / 2] = CYNORM_ROW_PAIR_HALVES(tails_1[k], tails_1[k + 1]);
            tail_halves[2 + k / 2] = CYNORM_ROW_PAIR_HALVES(tails_2[k], tails_2[k + 1]);
        }
        #undef CYNORM_ROW_PAIR_HALVES
        for (int a = 0; a < 2; a++) {
            /* lanes j += j + 2 (lanes_total); the tails' (q0 + q4 + q2 + q6) + (q1 + q5 + q3 + q7) + rest */
            cynorm_float_8 pairs = __builtin_shufflevector(halves[2 * a], halves[2 * a + 1], 0, 1, 4, 5, 8, 9, 12, 13)
                                   + __builtin_shufflevector(halves[2 * a], halves[2 * a + 1],
                                                             2, 3, 6, 7, 10, 11, 14, 15);
            cynorm_float_8 tail_pairs = __builtin_shufflevector(tail_halves[2 * a], tail_halves[2 * a + 1],
                                                                0, 1, 4, 5, 8, 9, 12, 13)
                                        + __builtin_shufflevector(tail_halves[2 * a], tail_halves[2 * a + 1],
                                                                  2, 3, 6, 7, 10, 11, 14, 15);
            cynorm_float_8 tails = (__builtin_shufflevector(tail_pairs, tail_pairs, 0, 2, 4, 6, 0, 2, 4, 6)
                                    + __builtin_shufflevector(tail_pairs, tail_pairs, 1, 3, 5, 7, 1, 3, 5, 7))
                                   + (cynorm_float_8){rest[4 * a], rest[4 * a + 1], rest[4 * a + 2], rest[4 * a + 3]};
            cynorm_double_4 sums = __builtin_convertvector(__builtin_shufflevector(tails, tails, 0, 1, 2, 3),
                                                           cynorm_double_4);
            if (body > 0)
                sums = (__builtin_convertvector(__builtin_shufflevector(pairs, pairs, 0, 2, 4, 6), cynorm_double_4)
                        + __builtin_convertvector(__builtin_shufflevector(pairs, pairs, 1, 3, 5, 7), cynorm_double_4))
                       + sums;
            for (int j = 0; j < 4; j++)
                totals[4 * a + j] = sums[j];
        }
    }
    /* Rows forward: cynorm_rows4_forward_float of the AVX-512 builds in 8-value vectors, with the same
       operations in the same order (the same bits): the four rows' head means, each row's 32 lanes in registers
       of its own, then the ends of the four rows' lane trees taken together.  Layer norm forward on a Zen 3, A/B in
       one process against a row at a time: up to 7.5 MiB, rows of 80 1.9x, 96-128 1.6x, 192 1.5x, 256 1.3-1.5x,
       384 1.1-1.4x, 512 1.1-1.3x, 576-1024 1.0x; at 8-14 MiB, rows of 128 1.2-1.6x, of 256 0.86-1.27x, of
       384-512 0.84-1.13x: hence these builds' smaller limits. */
    #define CYNORM_FORWARD_QUAD_ROW 512
    #define CYNORM_FORWARD_QUAD_VALUES ((Py_ssize_t)1 << 21)   /* 8 MiB of float */
    static inline int cynorm_rows4_forward_float(const float* x, float* y,   /* rows k at k * length */
            Py_ssize_t length, const float* weight, const float* bias, double eps, int centered,
            double* mean, double* rstd,                                     /* OUT rows k at k */
            const float* next_x) {              /* the next four rows, prefetched meanwhile, or NULL */
        typedef cynorm_float_8 vector;
        typedef cynorm_double_4 doubles;
        const Py_ssize_t body = length - length % 32;
        vector lanes_1[4], lanes_2[4], tails_1[4], tails_2[4];   /* each row's lanes after lanes_total's first
                                                                    two steps, and its 8 tail lanes */
        float centre[4];
        int refused = 0;
        for (int k = 0; k < 4; k++) {   /* head_mean: the first 32 values in 8 double lanes, 4 in each half */
            centre[k] = 0.0f;
            if (centered) {
                doubles low = (doubles){0}, high = (doubles){0};
                for (int step = 0; step < 4; step++) {
                    vector v = *(const cynorm_float_8u*)(x + k * length + 8 * step);
                    low += __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), doubles);
                    high += __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), doubles);
                }
                doubles p = low + high;   /* lanes j + (j + 4) */
                centre[k] = (float)((((p[0] + p[2]) + (p[1] + p[3])) + 0.0) * (1.0 / 32));
            }
        }
        for (int k = 0; k < 4; k++)   /* centred_sums (the values after the 32 lanes: 16, or none) */
            cynorm_row_lanes_8(CYNORM_CENTRED, x + k * length, NULL, NULL, body, length,
                               (vector)_mm256_set1_ps(centre[k]), (vector){0}, (vector){0},
                               &lanes_1[k], &lanes_2[k], &tails_1[k], &tails_2[k]);
        double totals[8];   /* the four rows' first sums, then their second sums */
        cynorm_four_rows_totals_8(lanes_1, lanes_2, tails_1, tails_2, body, (const float[8]){0}, totals);
        for (int k = 0; k < 4; k++)
            refused |= cynorm_single_chunk_statistics(totals[k], totals[4 + k], centre[k], length, eps, centered,
                                                      &mean[k], &rstd[k]) << k;
        for (int k = 0; k < 4; k++) {
            if (refused & (1 << k))
                continue;
            const float mean_hi = (float)mean[k];
            const vector mh = (vector)_mm256_set1_ps(mean_hi);
            const vector ml = (vector)_mm256_set1_ps(cynorm_mean_rest(mean[k], mean_hi));
            const vector rs = (vector)_mm256_set1_ps((float)rstd[k]);
            if (next_x)   /* the line of the row's last value, which a row that does not start a line adds */
                __builtin_prefetch(next_x + (k + 1) * length - 1, 0, 3);
            for (Py_ssize_t i = 0; i < length; i += 16) {
                if (next_x)   /* (a line for each line written: the memory keeps busy) */
                    __builtin_prefetch(next_x + k * length + i, 0, 3);
                for (int h = 0; h < 16; h += 8) {
                    vector v = *(const cynorm_float_8u*)(x + k * length + i + h);
                    *(cynorm_float_8u*)(y + k * length + i + h) =
                        ((((v - mh) - ml) * rs) * *(const cynorm_float_8u*)(weight + i + h))
                        + *(const cynorm_float_8u*)(bias + i + h);
                }
            }
        }
        return refused;
    }
    /* Rows backward: cynorm_rows4_coefficients_float of the AVX-512 builds in 8-value vectors (the same bits),
       each row's gradient sums in registers of its own, the ends of the four rows' trees and their coefficients
       taken together; the rows' dx and parameter terms then go a row at a time (see
       cynorm_rows4_row_loops_backward_float).  Layer norm backward on a Zen 3, A/B in one process against a row
       at a time, not streamed (1-4 MiB): rows of 32 2.2x, 48 2.9x, 64 1.7x, 80 2.2x, 96 1.6x, 112 2.0x, 128
       1.5x, 144 1.8x, 192 1.3x, 256 1.1-1.2x, 384-1024 0.92-1.1x; streamed (6-16 MiB): rows of 32 2.2x, 48 2.7x,
       64 1.6x, 96 1.3x, 128 1.1-1.3x (256: 1.0x). */
    #define CYNORM_BACKWARD_QUAD_ROW 256
    static inline __attribute__((always_inline)) void cynorm_rows4_coefficients_float(
            const float* dy, const float* x,                    /* rows k at k * row_stride */
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight,
            const double* mean, const double* rstd,            /* rows k at k * stat_stride; mean NULL: zeros */
            Py_ssize_t stat_stride, int centered,
            float mean_hi[4], float mean_lo[4], float rs_f[4], float coef_x_f[4], float coef_0_f[4]) {  /* OUT */
        typedef cynorm_float_8 vector;
        const Py_ssize_t body = length - length % 32;           /* summed in 32 lanes, the 16 left in 8 */
        vector lanes_g[4], lanes_gx[4], tails_g[4], tails_gx[4];
        double totals[8];
        cynorm_four_row_statistics(mean, rstd, stat_stride, mean_hi, mean_lo, rs_f);
        for (int k = 0; k < 4; k++)   /* gradient_sums with the weight */
            cynorm_row_lanes_8(CYNORM_WEIGHTED, x + k * row_stride, dy + k * row_stride, weight, body, length,
                               (vector)_mm256_set1_ps(mean_hi[k]), (vector)_mm256_set1_ps(mean_lo[k]),
                               (vector)_mm256_set1_ps(rs_f[k]), &lanes_g[k], &lanes_gx[k], &tails_g[k], &tails_gx[k]);
        cynorm_four_rows_totals_8(lanes_g, lanes_gx, tails_g, tails_gx, body, (const float[8]){0}, totals);
        cynorm_double_4 sum_g = {totals[0], totals[1], totals[2], totals[3]};
        cynorm_double_4 sum_gx = {totals[4], totals[5], totals[6], totals[7]};
        /* (each row's sums start from 0.0) */
        cynorm_four_coefficients(0.0 + sum_g, 0.0 + sum_gx, rstd, stat_stride, mean_lo, length, centered, coef_x_f,
                                 coef_0_f);
    }
    /* Rows backward, several elements per channel: cynorm_channels4_gradient_sums_float of the AVX-512 builds in
       8-value vectors (the same bits), each channel's 32 lanes in registers of its own.  With the channels' dx
       below, on a Zen 3, A/B against a channel at a time: channels-first GroupNorm backward (16,512,7,7) and
       (32,512,7,7) G=32 2.4x, (16,1024,7,7) 2.4x, (16,2048,7,7) 1.9x, (32,256,8,8) and (64,256,8,8) 1.4-1.5x,
       (8,256,14,14) 1.2x; InstanceNorm (64,128,4,4) 2.4x, (32,256,8,8) 1.7x. */
    static inline __attribute__((always_inline)) void cynorm_channels4_gradient_sums_float(
            const float* dy, const float* x, Py_ssize_t inner, Py_ssize_t stride,
            const float* mean_hi, const float* mean_lo, const float* rs,   /* (4,) each */
            double* sum_dy, double* sum_dy_xhat) {                      /* OUT (4,) each */
        typedef cynorm_float_8 vector;
        const Py_ssize_t body = inner - inner % 32, tail_body = inner - inner % 8;
        vector lanes_1[4], lanes_2[4], tails_1[4], tails_2[4];
        float rest[8];
        double totals[8];
        for (int k = 0; k < 4; k++) {   /* gradient_sums without a weight, the values left one by one */
            const float* g = dy + k * stride;
            const float* v = x + k * stride;
            cynorm_row_lanes_8(CYNORM_UNWEIGHTED, v, g, NULL, body, tail_body, (vector)_mm256_set1_ps(mean_hi[k]),
                               (vector)_mm256_set1_ps(mean_lo[k]), (vector)_mm256_set1_ps(rs[k]),
                               &lanes_1[k], &lanes_2[k], &tails_1[k], &tails_2[k]);
            rest[k] = rest[4 + k] = 0.0f;
            for (Py_ssize_t i = tail_body; i < inner; i++) {
                rest[k] += g[i];
                rest[4 + k] += g[i] * (((v[i] - mean_hi[k]) - mean_lo[k]) * rs[k]);
            }
        }
        cynorm_four_rows_totals_8(lanes_1, lanes_2, tails_1, tails_2, body, rest, totals);
        for (int k = 0; k < 4; k++) {   /* (each channel's sums start from 0.0) */
            sum_dy[k] = 0.0 + totals[k];
            sum_dy_xhat[k] = 0.0 + totals[4 + k];
        }
    }
    /* input_gradient_values for whole channels of `inner` values: the same operations, each channel's whole
       vectors, then its last values one by one */
    static void cynorm_channels_input_gradient_float(const float* dy, const float* x, float* dx,
            Py_ssize_t inner, Py_ssize_t channels, const float* weight,   /* the channels' weights */
            double rstd, float mean_hi, float coef_x, float coef_0) {
        typedef cynorm_float_8 vector;
        const vector mh = (vector)_mm256_set1_ps(mean_hi), cx = (vector)_mm256_set1_ps(coef_x);
        const vector c0 = (vector)_mm256_set1_ps(coef_0);
        const Py_ssize_t whole = inner - inner % 8;
        for (Py_ssize_t c = 0; c < channels; c++) {
            const float scale_f = (float)(rstd * (double)weight[c]);
            const vector scale = (vector)_mm256_set1_ps(scale_f);
            const float* g = dy + c * inner;
            const float* v = x + c * inner;
            float* out = dx + c * inner;
            Py_ssize_t i = 0;
            for (; i < whole; i += 8)
                *(cynorm_float_8u*)(out + i) = ((scale * *(const cynorm_float_8u*)(g + i))
                                                + (cx * (*(const cynorm_float_8u*)(v + i) - mh))) + c0;
            for (; i < inner; i++)
                out[i] = ((scale_f * g[i]) + (coef_x * (v[i] - mean_hi))) + coef_0;
        }
    }
    #define CYNORM_HAVE_CHANNEL_QUADS 1
    #else
    #define CYNORM_HAVE_ROW_LOOP 0
    #define CYNORM_ROW_LOOP_JOINS_LINES 0
    #define CYNORM_HAVE_CHANNEL_QUADS 0
    static inline void cynorm_channels_input_gradient_float(const float* dy, const float* x, float* dx,
            Py_ssize_t inner, Py_ssize_t channels, const float* weight, double rstd, float mean_hi, float coef_x,
            float coef_0) {
        (void)dy; (void)x; (void)dx; (void)inner; (void)channels; (void)weight; (void)rstd; (void)mean_hi;
        (void)coef_x; (void)coef_0;
    }
    #define CYNORM_BACKWARD_QUAD_ROW 0
    #define CYNORM_FORWARD_QUAD_ROW 0
    #define CYNORM_FORWARD_QUAD_VALUES 0
    static inline int cynorm_rows4_forward_float(const float* x, float* y, Py_ssize_t length, const float* weight,
            const float* bias, double eps, int centered, double* mean, double* rstd, const float* next_x) {
        (void)x; (void)y; (void)length; (void)weight; (void)bias; (void)eps; (void)centered; (void)mean;
        (void)rstd; (void)next_x;
        return 15;
    }
    static inline void cynorm_row_input_gradient_float(
            const float* dy, const float* x, float* dx, Py_ssize_t length, const float* weight,
            float rs, float mean_hi, float mean_lo, float coef_x, float coef_0,
            float* dweight_run, float* dbias_run, int stream, cynorm_stream_writer* writer,
            const float* next_dy, const float* next_x) {
        (void)dy; (void)x; (void)dx; (void)length; (void)weight; (void)rs; (void)mean_hi; (void)mean_lo;
        (void)coef_x; (void)coef_0; (void)dweight_run; (void)dbias_run; (void)stream; (void)writer; (void)next_dy;
        (void)next_x;
    }
    #endif
    static inline void cynorm_rows4_backward_float(const float* dy, const float* x, float* dx,
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight, const double* mean, const double* rstd,
            Py_ssize_t stat_stride, int centered, float* dweight_run, float* dbias_run, int stream) {
        (void)dy; (void)x; (void)dx; (void)row_stride; (void)length; (void)weight; (void)mean; (void)rstd;
        (void)stat_stride; (void)centered; (void)dweight_run; (void)dbias_run; (void)stream;
    }
    static inline void cynorm_rows16_backward_float(const float* dy, const float* x, float* out,
            Py_ssize_t row_stride, Py_ssize_t out_stride, const float* weight, const float* mean_hi,
            const float* mean_lo, const float* rs, const double* rstd, Py_ssize_t stat_stride, int centered,
            float* dweight_run, float* dbias_run, double* dweight_partial, double* dbias_partial) {
        (void)dy; (void)x; (void)out; (void)row_stride; (void)out_stride; (void)weight; (void)mean_hi;
        (void)mean_lo; (void)rs; (void)rstd; (void)stat_stride; (void)centered; (void)dweight_run;
        (void)dbias_run; (void)dweight_partial; (void)dbias_partial;
    }
    #endif
    #if CYNORM_HAVE_CHANNEL_QUADS
    /* backward_row's sums over a row's channels, four channels at a time, each added into the channel's
       dweight and dbias accumulators and into the row's sum(g) and sum(g * xhat) in channel order, as
       backward_row adds them; returns how many channels it took (the whole fours).  Out of line: inlined,
       its vectors enlarged the frame of backward_row, called for every row, and instance norm's rows of a
       single channel, which take none of this, ran 0.82-0.85x. */
    static __attribute__((noinline)) Py_ssize_t cynorm_channel_quads_gradient_sums_float(
            const float* dy, const float* x, Py_ssize_t inner, Py_ssize_t channels, const float* weight,
            float mean_hi, float mean_lo, float rs, double* dweight_acc, double* dbias_acc,
            double* sum_g, double* sum_g_xhat) {
        double four_dy[4], four_dy_xhat[4];
        double g_total = *sum_g, g_xhat_total = *sum_g_xhat;   /* (in registers: the accumulators may alias) */
        const float four_mean_hi[4] = {mean_hi, mean_hi, mean_hi, mean_hi};
        const float four_mean_lo[4] = {mean_lo, mean_lo, mean_lo, mean_lo};
        const float four_rs[4] = {rs, rs, rs, rs};
        Py_ssize_t c = 0;
        for (; c + 4 <= channels; c += 4) {
            cynorm_channels4_gradient_sums_float(dy + c * inner, x + c * inner, inner, inner, four_mean_hi,
                                                 four_mean_lo, four_rs, four_dy, four_dy_xhat);
            for (int k = 0; k < 4; k++) {
                dweight_acc[c + k] += four_dy_xhat[k];
                dbias_acc[c + k] += four_dy[k];
                g_total += (double)weight[c + k] * four_dy[k];
                g_xhat_total += (double)weight[c + k] * four_dy_xhat[k];
            }
        }
        *sum_g = g_total;
        *sum_g_xhat = g_xhat_total;
        return c;
    }
    /* Rows backward, groups of a single channel (instance norm, group norm with a group per channel): the
       gradient sums of four rows of the same channel, `row_stride` values apart, each with its own statistics
       (rows k at k * stat_stride; mean NULL: zeros), as above.  Out of line, as the function above. */
    static __attribute__((noinline)) void cynorm_channel_rows4_gradient_sums_float(
            const float* dy, const float* x, Py_ssize_t row_stride, Py_ssize_t inner,
            const double* mean, const double* rstd, Py_ssize_t stat_stride,
            double* sum_dy, double* sum_dy_xhat) {                      /* OUT (4,) each */
        float mean_hi[4], mean_lo[4], rs[4];
        cynorm_four_row_statistics(mean, rstd, stat_stride, mean_hi, mean_lo, rs);
        cynorm_channels4_gradient_sums_float(dy, x, inner, row_stride, mean_hi, mean_lo, rs, sum_dy, sum_dy_xhat);
    }
    #else
    static inline Py_ssize_t cynorm_channel_quads_gradient_sums_float(const float* dy, const float* x,
            Py_ssize_t inner, Py_ssize_t channels, const float* weight, float mean_hi, float mean_lo, float rs,
            double* dweight_acc, double* dbias_acc, double* sum_g, double* sum_g_xhat) {
        (void)dy; (void)x; (void)inner; (void)channels; (void)weight; (void)mean_hi; (void)mean_lo; (void)rs;
        (void)dweight_acc; (void)dbias_acc; (void)sum_g; (void)sum_g_xhat;
        return 0;
    }
    static inline void cynorm_channel_rows4_gradient_sums_float(const float* dy, const float* x,
            Py_ssize_t row_stride, Py_ssize_t inner, const double* mean, const double* rstd, Py_ssize_t stat_stride,
            double* sum_dy, double* sum_dy_xhat) {
        (void)dy; (void)x; (void)row_stride; (void)inner; (void)mean; (void)rstd; (void)stat_stride; (void)sum_dy;
        (void)sum_dy_xhat;
    }
    #endif
    #if CYNORM_BACKWARD_QUAD_ROW
    /* Rows backward, one element per channel, four float rows of a multiple of 16 values: their sums and
       coefficients taken together, as cynorm_rows4_backward_float takes them, then each row's dx and parameter
       terms in one loop, as cynorm_row_input_gradient_float writes them (the same bits), with streaming stores
       if `stream` (AVX2 builds only, dx starting a line).  See CYNORM_BACKWARD_QUAD_ROW. */
    static inline void cynorm_rows4_row_loops_backward_float(
            const float* dy, const float* x, float* dx,        /* rows k at k * row_stride */
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight,
            const double* mean, const double* rstd,            /* rows k at k * stat_stride; mean NULL: zeros */
            Py_ssize_t stat_stride, int centered, float* dweight_run, float* dbias_run, int stream) {
        float mean_hi[4], mean_lo[4], rs[4], coef_x[4], coef_0[4];
        cynorm_rows4_coefficients_float(dy, x, row_stride, length, weight, mean, rstd, stat_stride, centered,
                                        mean_hi, mean_lo, rs, coef_x, coef_0);
        for (int k = 0; k < 4; k++)
            cynorm_row_input_gradient_float(dy + k * row_stride, x + k * row_stride, dx + k * row_stride, length,
                                            weight, rs[k], mean_hi[k], mean_lo[k], coef_x[k], coef_0[k],
                                            dweight_run, dbias_run, stream, NULL, NULL, NULL);
    }
    #else
    static inline void cynorm_rows4_row_loops_backward_float(const float* dy, const float* x, float* dx,
            Py_ssize_t row_stride, Py_ssize_t length, const float* weight, const double* mean, const double* rstd,
            Py_ssize_t stat_stride, int centered, float* dweight_run, float* dbias_run, int stream) {
        (void)dy; (void)x; (void)dx; (void)row_stride; (void)length; (void)weight; (void)mean; (void)rstd;
        (void)stat_stride; (void)centered; (void)dweight_run; (void)dbias_run; (void)stream;
    }
    #endif

    /* Fresh output pages: a large new array is often a fresh mapping whose pages are faulted in one 4 KiB
       page at a time by the first writes; asking for transparent huge pages faults it in 2 MiB at a time. */
    #if defined(__linux__)
    #include <sys/mman.h>
    #include <unistd.h>
    #endif
    static int cynorm_page_is_resident(uintptr_t page) {
    #if defined(__linux__)
        unsigned char resident = 1;
        if (mincore((void*)page, 1, &resident) != 0) return 1;
        return resident & 1;
    #else
        (void)page; return 1;
    #endif
    }
    /* Whether the first or the last whole page of [address, address + nbytes) has never been touched. */
    static int cynorm_has_untouched_pages(uintptr_t address, size_t nbytes) {
    #if defined(__linux__)
        long page_size = sysconf(_SC_PAGESIZE);
        uintptr_t first, last;
        if (page_size <= 0) return 0;
        first = (address + page_size - 1) / page_size * page_size;
        last = (address + nbytes) / page_size * page_size;
        if (last < first + page_size) return 0;
        return !cynorm_page_is_resident(first) || !cynorm_page_is_resident(last - page_size);
    #else
        (void)address; (void)nbytes; return 0;
    #endif
    }
    /* A hint: errors (no THP in this kernel, or not an anonymous mapping) leave the memory as it was. */
    static void cynorm_advise_huge_pages(uintptr_t address, size_t nbytes) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        long page_size = sysconf(_SC_PAGESIZE);
        uintptr_t first, last;
        if (page_size <= 0) return;
        first = (address + page_size - 1) / page_size * page_size;
        last = (address + nbytes) / page_size * page_size;
        if (last > first) madvise((void*)first, last - first, MADV_HUGEPAGE);
    #else
        (void)address; (void)nbytes;
    #endif
    }

    /* Whether the build lets the compiler check enough pointer pairs for overlap to vectorize loops over four
       rows at a time (setup.py defines it along with GCC's --param); without it those loops ran 1.3-2x slower
       than a row at a time, so the kernels take one row at a time. */
    #ifndef CYNORM_WIDE_ALIAS_CHECKS
    #define CYNORM_WIDE_ALIAS_CHECKS 0
    #endif

    /* 0: baseline, 3: x86-64-v3 (AVX2, FMA, ...), 4: x86-64-v4 (AVX-512 F, BW, CD, DQ, VL), each only if the OS
       saves the wider registers.  Read from cpuid, since __builtin_cpu_supports knows the level names only
       from GCC 12 and not in clang: builds by other compilers ran their baseline kernels on every CPU. */
    #if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    #include <cpuid.h>
    #define CYNORM_HAS_BITS(value, bits) (((value) & (bits)) == (bits))
    static int cynorm_cpu_level(void) {
        unsigned int eax, ebx, ecx, edx, ecx1, ebx7, ecx_ext, xcr0_low, xcr0_high;
        if (__get_cpuid_max(0, 0) < 7 || __get_cpuid_max(0x80000000u, 0) < 0x80000001u) return 0;
        __cpuid(1, eax, ebx, ecx1, edx);
        __cpuid_count(7, 0, eax, ebx7, ecx, edx);
        __cpuid(0x80000001u, eax, ebx, ecx_ext, edx);
        /* v2 (SSE3, SSSE3, CX16, SSE4.1, SSE4.2, POPCNT) and v3's FMA, MOVBE, OSXSAVE, AVX, F16C */
        if (!CYNORM_HAS_BITS(ecx1, (1u << 0) | (1u << 9) | (1u << 12) | (1u << 13) | (1u << 19) | (1u << 20) |
                                   (1u << 22) | (1u << 23) | (1u << 27) | (1u << 28) | (1u << 29)))
            return 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
        (void)xcr0_high;
        if (!CYNORM_HAS_BITS(xcr0_low, 0x6u)                     /* the OS saves XMM and YMM state */
            || !CYNORM_HAS_BITS(ebx7, (1u << 3) | (1u << 5) | (1u << 8))  /* BMI1, AVX2, BMI2 */
            || !CYNORM_HAS_BITS(ecx_ext, (1u << 0) | (1u << 5)))        /* LAHF/SAHF, LZCNT */
            return 0;
        if (CYNORM_HAS_BITS(xcr0_low, 0xE0u)                     /* ... and opmask and ZMM state */
            && CYNORM_HAS_BITS(ebx7, (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31)))
            return 4;                                            /* AVX-512 F, DQ, CD, BW, VL */
        return 3;
    }
    #else
    static int cynorm_cpu_level(void) { return 0; }
    #endif
    """
    bint CYNORM_HAVE_OPENMP
    int omp_get_max_threads() noexcept nogil
    int cynorm_cpu_level() noexcept nogil
    bint CYNORM_HAVE_FLOAT16
    bint CYNORM_HAVE_STREAM
    bint CYNORM_WIDE_ALIAS_CHECKS
    bint CYNORM_HAVE_VECTOR_TREES
    double cynorm_lanes_total_float(const float* lanes, float tail) noexcept nogil
    double cynorm_lanes_total_double(const double* lanes, double tail) noexcept nogil
    void cynorm_stream_floats(float* dst, const float* src, Py_ssize_t n) noexcept nogil
    void cynorm_stream_doubles(double* dst, const double* src, Py_ssize_t n) noexcept nogil
    void cynorm_store_fence() noexcept nogil
    void cynorm_normalize_tile_streamed_float(const float* x, float* y, Py_ssize_t values, Py_ssize_t width,
                                              const float* mean_hi, const float* scale,
                                              const float* shift) noexcept nogil
    void cynorm_normalize_tile_streamed_double(const double* x, double* y, Py_ssize_t values, Py_ssize_t width,
                                               const double* mean_hi, const double* scale,
                                               const double* shift) noexcept nogil
    void cynorm_input_gradient_tile_streamed_float(const float* dy, const float* x, float* dx, Py_ssize_t values,
                                                   Py_ssize_t width, const float* mean_hi, const float* scale,
                                                   const float* coef_x, const float* coef_0) noexcept nogil
    void cynorm_input_gradient_tile_streamed_double(const double* dy, const double* x, double* dx,
                                                    Py_ssize_t values, Py_ssize_t width, const double* mean_hi,
                                                    const double* scale, const double* coef_x,
                                                    const double* coef_0) noexcept nogil
    ctypedef struct cynorm_stream_writer:
        pass
    void cynorm_stream_writer_open(cynorm_stream_writer* writer) noexcept nogil
    Py_ssize_t WRITER_BYTES "CYNORM_WRITER_BYTES"
    void cynorm_stream_writer_floats_put(cynorm_stream_writer* writer, float* dst, const float* src,
                                         Py_ssize_t n) noexcept nogil
    void cynorm_stream_writer_doubles_put(cynorm_stream_writer* writer, double* dst, const double* src,
                                          Py_ssize_t n) noexcept nogil
    void cynorm_stream_writer_floats_flush(cynorm_stream_writer* writer) noexcept nogil
    void cynorm_stream_writer_doubles_flush(cynorm_stream_writer* writer) noexcept nogil
    void cynorm_prefetch_lines(const void* p, Py_ssize_t nbytes) noexcept nogil
    double cynorm_mean_beyond_float(double mean, float mean_hi) noexcept nogil
    Py_ssize_t cynorm_moments_strips_float(const float* x, Py_ssize_t rows, Py_ssize_t width, Py_ssize_t stride,
                                           Py_ssize_t readable_rows, Py_ssize_t ahead, const float* centre,
                                           float* s1, float* s2) noexcept nogil
    Py_ssize_t cynorm_moments_strips_double(const double* x, Py_ssize_t rows, Py_ssize_t width, Py_ssize_t stride,
                                            Py_ssize_t readable_rows, Py_ssize_t ahead, const double* centre,
                                            double* s1, double* s2) noexcept nogil
    Py_ssize_t cynorm_gradient_strips_float(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t stride,
                                            Py_ssize_t readable_rows, Py_ssize_t ahead, const float* mean_hi,
                                            float* s1, float* s2) noexcept nogil
    Py_ssize_t cynorm_gradient_strips_double(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t stride,
                                             Py_ssize_t readable_rows, Py_ssize_t ahead, const double* mean_hi,
                                             double* s1, double* s2) noexcept nogil
    Py_ssize_t cynorm_values_past_line(const void* p, Py_ssize_t itemsize) noexcept nogil
    Py_ssize_t cynorm_values_to_vector(const void* p, Py_ssize_t itemsize) noexcept nogil
    bint CYNORM_HAVE_ROW_QUADS
    bint CYNORM_HAVE_CHANNEL_QUADS
    Py_ssize_t CYNORM_FORWARD_QUAD_ROW
    Py_ssize_t CYNORM_BACKWARD_QUAD_ROW
    Py_ssize_t CYNORM_FORWARD_QUAD_VALUES
    bint CYNORM_HAVE_ROW_LOOP
    bint CYNORM_NORMALIZE_ROW_QUADS
    bint CYNORM_MOMENTS_EIGHT_ROWS
    bint CYNORM_ROWS_AHEAD_ONE_AT_A_TIME
    bint CYNORM_ROW_LOOP_JOINS_LINES
    void cynorm_channels_input_gradient_float(const float* dy, const float* x, float* dx, Py_ssize_t inner,
                                              Py_ssize_t channels, const float* weight, double rstd,
                                              float mean_hi, float coef_x, float coef_0) noexcept nogil
    Py_ssize_t cynorm_channel_quads_gradient_sums_float(const float* dy, const float* x, Py_ssize_t inner,
                                                       Py_ssize_t channels, const float* weight, float mean_hi,
                                                       float mean_lo, float rs, double* dweight_acc,
                                                       double* dbias_acc, double* sum_g,
                                                       double* sum_g_xhat) noexcept nogil
    void cynorm_channel_rows4_gradient_sums_float(const float* dy, const float* x, Py_ssize_t row_stride,
                                                  Py_ssize_t inner, const double* mean, const double* rstd,
                                                  Py_ssize_t stat_stride, double* sum_dy,
                                                  double* sum_dy_xhat) noexcept nogil
    void cynorm_rows16_backward_float(const float* dy, const float* x, float* out, Py_ssize_t row_stride,
                                      Py_ssize_t out_stride, const float* weight, const float* mean_hi,
                                      const float* mean_lo, const float* rs, const double* rstd,
                                      Py_ssize_t stat_stride, bint centered, float* dweight_run, float* dbias_run,
                                      double* dweight_partial, double* dbias_partial) noexcept nogil
    int cynorm_rows4_forward_float(const float* x, float* y, Py_ssize_t length, const float* weight,
                                   const float* bias, double eps, bint centered, double* mean, double* rstd,
                                   const float* next_x) noexcept nogil
    void cynorm_rows4_backward_float(const float* dy, const float* x, float* dx, Py_ssize_t row_stride,
                                     Py_ssize_t length, const float* weight, const double* mean, const double* rstd,
                                     Py_ssize_t stat_stride, bint centered, float* dweight_run,
                                     float* dbias_run, bint stream) noexcept nogil
    void cynorm_row_input_gradient_float(const float* dy, const float* x, float* dx, Py_ssize_t length,
                                         const float* weight, float rs, float mean_hi, float mean_lo, float coef_x,
                                         float coef_0, float* dweight_run, float* dbias_run, bint stream,
                                         cynorm_stream_writer* writer, const float* next_dy,
                                         const float* next_x) noexcept nogil
    void cynorm_rows4_row_loops_backward_float(const float* dy, const float* x, float* dx, Py_ssize_t row_stride,
                                               Py_ssize_t length, const float* weight, const double* mean,
                                               const double* rstd, Py_ssize_t stat_stride, bint centered,
                                               float* dweight_run, float* dbias_run, bint stream) noexcept nogil
    int CYNORM_LINE_BYTES
    bint cynorm_has_untouched_pages(size_t address, size_t nbytes) noexcept nogil
    void cynorm_advise_huge_pages(size_t address, size_t nbytes) noexcept nogil
    void cynorm_halves_to_floats(const unsigned short* bits, float* out, Py_ssize_t n) noexcept nogil
    void cynorm_floats_to_halves(const float* values, unsigned short* bits, Py_ssize_t n) noexcept nogil

cdef enum:
    # Rows backward: the parameter gradients' partial sums of the blocks are added up this many columns at a time
    # (in a local array), a range of columns per task.
    REDUCE_COLUMNS = 256
    # Independent partial sums per reduction: the compiler vectorizes across them, the order stays fixed.
    # lanes_total spells out the tree for exactly 32.
    LANES = 32
    # The values after the last whole LANES block (all of a short row's) are summed in this many lanes, the
    # last few one by one.  Summed one by one, each add waited on the one before: rows of 26 values took
    # 3.6 ns a value.  tail_lanes_total spells out the tree for exactly 8.
    TAIL_LANES = 8
    # Elements of a row whose moments are computed while they sit in L1, before merging.
    CHUNK = 4096
    # Columns view: a tile holds about this many elements, and at most MAX_TILE_ROWS rows so that the
    # per-column float sums stay short; at least MIN_TILE_ROWS rows (or all), since each tile costs each
    # column group a few divisions, as many as the values of a few rows when a group is one column (layer
    # norm over a middle axis).  (Half as many, 65536, cut rows of 257-2047 values into twice the tiles:
    # channels-last GroupNorm forward (4,1024,768) 1.09x, (1,4096,512) 1.04x, (8,784,512) 1.04x faster
    # with these; backward 0.98-1.04x.  The longer float sums give rstd up to twice the error, 4.8e-7 at
    # most on (1,4096,512) of a mean 1e5 times its spread; tiles of 512 rows gained more, 1.07x and 1.13x,
    # but gave 2-6.5x the error, 1.6e-6.)
    TILE_ELEMS = 131072
    MAX_TILE_ROWS = 256
    MIN_TILE_ROWS = 64
    # Columns view: a sample of several tiles is cut into a multiple of this many tiles of nearly equal size,
    # so that 1, 2 or 4 threads get the same work (the cut depends on the shape only).
    TILE_MULTIPLE = 4
    # Columns view: the rows of a tile whose mean serves as the first centre.
    HEAD_ROWS = 8
    # Columns-view forward of samples of a single tile and many columns (channels-last maps of up to 256
    # positions with hundreds of channels), where the samples are fewer than two a thread or outgrow L2 (from
    # GROUP_BLOCKS_FROM_SAMPLE_BYTES): whole groups of columns are taken together over all the sample's rows, about
    # GROUP_BLOCK_BYTES of x, their statistics then their normalization, while they are in L2 (see group_blocks).
    # Blocks of rows narrower than GROUP_BLOCK_MIN_ROW_BYTES, or of samples of rows narrower than
    # GROUP_BLOCKS_FROM_ROW_BYTES, were slower than whole tiles.
    GROUP_BLOCK_BYTES = 131072
    GROUP_BLOCK_MIN_ROW_BYTES = 1024
    GROUP_BLOCKS_FROM_ROW_BYTES = 4096
    GROUP_BLOCKS_FROM_SAMPLE_BYTES = 524288
    # Columns view: samples are processed in batches of about this many elements, small enough that a batch
    # read for its statistics is still in the last-level cache when it is normalized.
    BATCH_ELEMS = 1048576
    # Columns view, whole samples per thread: odd threads run a sample ahead of even ones from samples of this
    # many bytes (see samples_ahead); L2's size on the development machine.
    STAGGER_FROM_BYTES = 1048576
    # Rows backward: samples are grouped into blocks of at most about this many elements for dweight/dbias.
    BLOCK_ELEMS = 65536
    # Rows backward with one element per channel (layer/RMS norm): each element's dweight/dbias terms are
    # summed in float over this many rows, then added into the block's double partials.
    ROWS_PER_FLUSH = 8
    # ... and added into those float sums this many rows at a time (a divisor of ROWS_PER_FLUSH), each sum still
    # taken row after row, so the bits are the same: a sum is loaded and stored once per four rows, where a row
    # at a time each row's add waited on the previous row's store (a third of the time of a layer norm backward
    # on rows of 32 values).  Layer norm backward, A/B: rows of 32 values 1.42x, 64 1.24x, 128 1.24x, (4096,768)
    # 1.38x.
    TERM_ROWS = 4
    # Rows backward, one element per channel: rows of at least LONG_ROW values are cut into CHUNK-sized pieces
    # for their gradient sums, and their dx and parameter terms are shared out CHANNEL_SLAB channels at a time
    # (long_rows_backward).  Layer norm backward: 512 rows of 8192 values 1.2x, 256 of 16384 1.6x, 8 of 65536
    # 3.9x, one of 2**20 30-40x.  (From 4096 values, 64 rows gained 1.1x but 2048 rows, 32 MiB, lost 6 %: the
    # pieces read the rows twice from memory, where a row at a time reads each from cache the second time.)
    LONG_ROW = 8192
    CHANNEL_SLAB = 2048
    # Columns view without a weight along the rows, fewer than WIDE_ROW columns (channels-last with few
    # channels): the statistics, the normalization, and the backward's sums and dx take a tile's rows several at
    # a time as one row of a multiple of WIDE_MULTIPLE values (rows_folded), so that the loops over a row run
    # whole vectors.  GroupNorm (32,26,26,10) channels-last, the Keras tutorial's: backward 2.4x, forward
    # 1.37x with the normalization folded and 1.18x more with the statistics; (1,262144,3) 3.8x and 1.7x, 2.0x;
    # (8,2048,20) 1.8x and 1.4x, 1.18x.  (Folding rows of 32 columns into 64 was slower.)
    WIDE_ROW = 32
    WIDE_MULTIPLE = 16
    # Columns view: the statistics and gradient sums of this many columns at a time are kept in local arrays
    # (see tile_moments_around).
    COLUMN_BLOCK = 1024
    # Columns view: tiles whose rows (folded) are this many values or more take their sums eight rows at a time
    # (see tile_moments_around).
    EIGHT_ROWS_FROM_WIDTH = 128
    # Streamed outputs are computed this many values at a time into an L1 buffer, then stored.
    STREAM_BLOCK = 256
    # The columns view's buffers hold this many values more, to place each block (see staged_block).
    STAGING_SLACK = 16
    # AVX2 builds: a streamed row's dx that does not start a line is computed this many values at a time into a
    # buffer (see backward_row).
    ROW_STAGE = 1024
    # Rows view, rows of at most SHORT_ROW values (layer or RMS norm over a few features, small groups): the
    # statistics of ROW_BLOCK rows are taken together, a row in each vector lane, where each row's own sums
    # ended in a tree of adds and a division that the next row waited on.  Layer norm forward on 2**18 values,
    # A/B in one process: rows of 4 values 2.6x, 10 2.4x, 16 2.3x, 24 1.9x, 32 1.5x, 48 1.5x, 64 0.94-1.13x
    # (rows of 64, a row at a time, have no tail of values to add one by one).
    ROW_BLOCK = 16
    SHORT_ROW = 64
    # The backward's sums and dx in lanes pay for moving three arrays in and out of them: against rows one at a
    # time (with TERM_ROWS), rows of 4 values 1.6x, 10 1.3x, 16 1.2x, 20 1.13x, but 24 0.94x.  AVX-512 builds
    # take 16 float rows of 16 values with a row in each vector instead (cynorm_rows16_backward_float, the
    # same operations in the same order): 3.0-3.2x on 4-16 MiB.
    SHORT_BACKWARD_ROW = 20
    # Rows backward, one element per channel (layer and RMS norm), float rows of a multiple of 16 values and of at
    # most CYNORM_BACKWARD_QUAD_ROW (1024 in AVX-512 builds), longer than SHORT_BACKWARD_ROW: four rows at a time
    # (cynorm_rows4_backward_float; the same bits).  Layer norm backward on 2**18 values, A/B in one process: rows of
    # 32 1.5-1.7x, 48 1.9x, 64 1.3-1.4x, 80-112 1.6x, 128 1.2x, 192-512 1.05-1.16x, 768 1.0x, 1024 0.93x.  Rows longer
    # than QUAD_STREAMED_ROW take only the four rows' sums and coefficients together, then each row's dx and terms in
    # one loop (cynorm_rows4_row_loops_backward_float): on 2**18-2**19 values, 1.14x faster than the four-row kernel on
    # rows of 144 values, 1.28x on 192, 1.20x on 256, 1.27x on 384, 1.04x on 448, 0.99-1.02x on 512 (1.13x 16 bytes
    # into a line), and than a row at a time 1.12x on 576, 1.12-1.15x on 768, 1.19x on 1024.  Rows of at most
    # QUAD_STREAMED_ROW take them also on large arrays, where dx streams: on 16 MiB, rows of 32-128 ran 1.15-2.0x
    # faster than a row at a time (256: 0.75x, so longer rows go a row at a time), and 1.13-1.47x faster again with
    # streaming stores than with ordinary ones (a dx 16 bytes past a line, through a buffer: 1.08-1.61x).  (Rows of 16
    # ran 2.0x faster this way than in lanes, but only AVX-512 builds have the four-row kernel, and the lanes' sums are
    # added in another order: every build gives the same bits.  They have a kernel of their own, in the lanes' order.)
    # AVX2 builds take rows of up to CYNORM_BACKWARD_QUAD_ROW = 256 values where dx does not stream, and of up to
    # QUAD_STREAMED_ROW where it does and starts a line, all of them the way rows longer than QUAD_STREAMED_ROW go
    # (the figures are with their cynorm_rows4_coefficients_float).
    QUAD_STREAMED_ROW = 128
    # Rows forward, the same rows longer than SHORT_ROW and of at most CYNORM_FORWARD_QUAD_ROW values (1024 in
    # AVX-512 builds, 512 in AVX2 builds, none in others), output not streamed, arrays of fewer than
    # CYNORM_FORWARD_QUAD_VALUES (AVX2 builds: 8 MiB): four rows at a time (cynorm_rows4_forward_float; the same bits),
    # each four asking for the next four while they are written (without that, arrays of 12-16 MiB ran 0.84-1.0x).
    # Layer norm forward on 2**18 values, A/B in one process on a Zen 5: rows of 80 1.9x, 96 1.6x, 128 1.5x, 192-384
    # 1.4x, 512 1.13-1.25x, 640-1024 1.06-1.15x, 2048 0.95x; on 12 MiB, rows of 768 1.13x, 1024 1.0x (the AVX2
    # kernel's figures are with it).  Rows of at most QUAD_STREAMED_ROW take them at every size, also where the output
    # would stream, with ordinary stores: on 16-64 MiB, rows of 80 1.9x, 96 1.5x, 128 1.14-1.58x faster than a row at
    # a time streamed (256: 0.93-1.38x, 384 0.89x, so longer rows stream); with AVX2 on a Zen 3, rows of 96-128 1.35x.
    # Rows backward, several elements per channel (channels-first group norm), float channels of fewer than
    # CHANNEL_QUAD_INNER values: the gradient sums four channels at a time and dx a channel at a time in vectors,
    # the last values under a mask (cynorm_channel_quads_gradient_sums_float, cynorm_channels_input_gradient_float;
    # the same bits).  Backward A/B, groups of (channels x values): (16,512,7,7) G=32 (16 x 49) 1.8x, (16,1024,7,7)
    # 2.0x, (32,256,8,8) G=32 (8 x 64) 1.2x, (8,256,14,14) 1.03x; channels of 3136 values 0.94-0.97x.
    CHANNEL_QUAD_INNER = 256
    # Rows backward, groups of one channel (instance norm) of at most CHANNEL_ROWS_INNER values: four rows of the
    # channel at a time (channel_rows4_backward; the same bits).  Backward A/B: (64,128,4,4) 1.8-1.9x,
    # (32,256,8,8) 1.5-1.8x; channels of 100-196 values ran 0.8-0.9x (each row's constants in vectors, four rows'
    # at once, outgrew the registers).
    CHANNEL_ROWS_INNER = 64
    # Rows backward, one element per channel, rows of at least FUSED_TERMS_ROW values taken one at a time: each
    # row's terms of dweight and dbias are added while its dx is written, a block at a time from L1, instead of
    # four rows' terms together afterwards (the same adds in the same order).  Layer norm backward A/B: rows of
    # 100-450 values 1.05-1.09x, 768-1024 1.02-1.11x, 2048 0.98-0.99x; on 12 MiB, rows of 768 1.02x, 1024 1.13x.
    # Shorter rows keep the four rows' terms, whose running sums are loaded and stored once for four rows.
    FUSED_TERMS_ROW = 64
    # Columns view: the statistics and gradient sums of a large input ask for the row about this many bytes
    # ahead (alone, the hardware prefetcher left that pass at a third of the memory's read speed).
    PREFETCH_AHEAD_BYTES = 4096
    # Columns view, builds without AVX-512: the statistics and gradient sums of a large input (its rows asked for
    # ahead) take rows of this many bytes or more one at a time, not four: the four rows' requests, 64 lines at
    # once on rows of 1 KiB, left the sums waiting on memory.  A/B on a Zen 3, the same bits: channels-last
    # GroupNorm forwards (8,3136,256) 1.36-1.55x, (2,16384,256) 1.37x, (8,4096,320) 1.32x, (4,4096,512)
    # 1.08-1.19x, (4,16384,128) 0.92-1.09x, backwards 1.03-1.45x ((1,4096,512) 1.35x); float64 rows of 1-2 KiB
    # 1.12-1.27x.  Rows of 256 bytes ran 0.92-1.05x (64 float32 values: InstanceNorm (8,16384,64)).
    ROW_AT_A_TIME_AHEAD_FROM_BYTES = 512
    # Rows view, large input: the row prefetched while a row is written is at least this many bytes ahead.
    # One row ahead of 3 KiB rows left the backward's first pass over the next row waiting on memory: layer
    # norm (4096,768) backward 1.33x faster with two in one A/B run, 1.07-1.23x in later ones (4096 bytes gave
    # 1.19x, 16384 the same as 8192), forward (8192,768) 1.12-1.25x.
    ROWS_AHEAD_BYTES = 8192
    # Rows view forward: the output row ahead is asked for too, on rows of these many bytes.  Longer ones fill L2
    # with what the rows ahead will need before the row being normalized is done with it: channels-first group
    # norm (1,768,64,64), rows of 384 KiB, ran 0.84x as fast with both rows ahead asked for (Zen 3).  On shorter
    # ones the requests cost more than they save: layer norm (12288,256), (8192,384) and (6144,512) forwards of
    # 12 MiB 0.92-1.04x.
    PREFETCHED_OUTPUT_MIN_ROW_BYTES = 3072
    PREFETCHED_OUTPUT_MAX_ROW_BYTES = 65536
    # float16 conversions: values per task (a multiple of 8, F16C's vector).
    CONVERT_BLOCK = 16384

HAVE_OPENMP = bool(CYNORM_HAVE_OPENMP)
# Whether half_to_float and float_to_half are available (the compiler knows _Float16).
HAVE_FLOAT16 = bool(CYNORM_HAVE_FLOAT16)
# Whether the `stream` argument of the forward kernels uses non-temporal stores (else it only costs a copy).
HAVE_STREAM = bool(CYNORM_HAVE_STREAM)
# The longest float rows (of a multiple of 16 values, longer than SHORT_ROW) whose forward this build takes four
# rows at a time (0: none; see CYNORM_FORWARD_QUAD_ROW).
FORWARD_QUAD_ROW = CYNORM_FORWARD_QUAD_ROW
PREFETCHED_OUTPUT_ROWS = (PREFETCHED_OUTPUT_MIN_ROW_BYTES, PREFETCHED_OUTPUT_MAX_ROW_BYTES)


def half_to_float(const unsigned short[::1] half_bits,   # IN  float16 values, as their bits
                  float[::1] out,                        # OUT as many
                  int num_threads):
    """Widens float16 to float32 (exactly), in parallel."""
    cdef Py_ssize_t block, n = out.shape[0]
    for block in prange((n + CONVERT_BLOCK - 1) // CONVERT_BLOCK, nogil=True, num_threads=num_threads,
                        schedule="static"):
        cynorm_halves_to_floats(&half_bits[block * CONVERT_BLOCK], &out[block * CONVERT_BLOCK],
                                min(<Py_ssize_t>CONVERT_BLOCK, n - block * CONVERT_BLOCK))


def float_to_half(const float[::1] values,             # IN
                  unsigned short[::1] out_bits,        # OUT float16 values, as their bits, as many
                  int num_threads):
    """Rounds float32 to the nearest float16 (ties to even, as NumPy's cast), in parallel."""
    cdef Py_ssize_t block, n = values.shape[0]
    for block in prange((n + CONVERT_BLOCK - 1) // CONVERT_BLOCK, nogil=True, num_threads=num_threads,
                        schedule="static"):
        cynorm_floats_to_halves(&values[block * CONVERT_BLOCK], &out_bits[block * CONVERT_BLOCK],
                                min(<Py_ssize_t>CONVERT_BLOCK, n - block * CONVERT_BLOCK))


def address_of(values):
    """The address of the first of `values` (a C-contiguous array of float32 or float64, which the caller has
    checked), as the kernels take their arrays; 0 when there are none (the kernels read nothing then).  Read
    through the buffer protocol: a typed memoryview's dispatch on the dtype took 0.4 µs, and a forward takes
    six addresses.  Values of another size than 4 or 8 bytes are refused, a last guard for the kernels."""
    cdef Py_buffer view
    cdef size_t address
    cdef Py_ssize_t itemsize
    PyObject_GetBuffer(values, &view, PyBUF_C_CONTIGUOUS)
    address = <size_t>view.buf if view.len > 0 else 0
    itemsize = view.itemsize
    PyBuffer_Release(&view)
    if itemsize != 4 and itemsize != 8:
        raise TypeError(f"the kernels take float32 or float64 values, got values of {itemsize} bytes")
    return address


# Below this rstd (standard deviations past ~1.2e18) a float32 backward's coefficient of x - mean falls toward
# float32's subnormal range: layer norm gradients on values of std 1e19 were within 1.2e-7 of float64's, on std
# 1e20 5.5e-6 off, on std 1e30 9% off (torch's own float32 kernels: all wrong from std 1e19, NaN beyond).
cdef double SMALLEST_FLOAT_RSTD = 2.0 ** -60


def float_coefficients_hold(size_t rstd, Py_ssize_t count):
    """Whether a float32 backward keeps its precision with these `count` rstd values (float64, at `rstd`): its
    coefficient of x - mean, -rstd**2 * mean(g * xhat), is stored in float32, which holds it only while rstd is
    above SMALLEST_FLOAT_RSTD.  (NaN rstd values hold: NaN stays NaN either way.)"""
    cdef const double* values = <const double*>rstd
    cdef Py_ssize_t k, below = 0
    for k in range(count):   # (counted without a branch, which the compiler vectorizes: 1M values in 0.17 ms)
        below += values[k] < SMALLEST_FLOAT_RSTD
    return below == 0


def has_untouched_pages(size_t address, size_t nbytes):
    """Whether [address, address + nbytes) starts or ends on a page never written since it was mapped (a fresh
    allocation)."""
    return nbytes > 0 and cynorm_has_untouched_pages(address, nbytes)


def advise_huge_pages(size_t address, size_t nbytes):
    """Asks the OS to back the untouched pages of [address, address + nbytes) with transparent huge pages
    (Linux; a hint)."""
    if nbytes > 0:
        cynorm_advise_huge_pages(address, nbytes)


def cpu_level():
    """The x86-64 micro-architecture level this CPU and OS run (0 when unknown or not x86-64)."""
    return cynorm_cpu_level()


def max_threads():
    """OpenMP's current thread limit (OMP_NUM_THREADS, threadpoolctl and the CPU count all apply)."""
    return omp_get_max_threads()


# ---------------------------------------------------------------------------------------------------------
# Moments
# ---------------------------------------------------------------------------------------------------------

ctypedef fused accumulator:
    float
    double


cdef inline double lanes_total(accumulator* lanes, accumulator tail) noexcept nogil:
    """Sum of the LANES lanes as a fixed pairwise tree (clobbering them), plus the tail.

    Constant bounds and indices everywhere, here and in the loops that fill the lanes (the tail goes to its
    own scalar), let the compiler keep the lanes in vector registers."""
    cdef int j
    for j in range(16):
        lanes[j] += lanes[j + 16]
    for j in range(8):
        lanes[j] += lanes[j + 8]
    for j in range(4):
        lanes[j] += lanes[j + 4]
    for j in range(2):
        lanes[j] += lanes[j + 2]
    return (<double>lanes[0] + <double>lanes[1]) + <double>tail


cdef inline accumulator tail_lanes_total(accumulator* lanes, accumulator rest) noexcept nogil:
    """Sum of the TAIL_LANES lanes as a fixed pairwise tree, plus `rest`."""
    return (((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]))) + rest


cdef inline double vector_lanes_total(accumulator* lanes, accumulator tail) noexcept nogil:
    """lanes_total, its tree written in vector types: the same adds in the same order, so the same bits.  In
    the moments' loops GCC vectorizes lanes_total's scalar tree itself, 3-7 % faster than this on rows of 70-256
    values; in gradient_sums it spilled the lanes and added them one at a time, which was most of a layer norm
    backward on rows of 32 values (1.3x with this).  (tail_lanes_total's scalar tree measured 7 % faster than
    its vector form there.)"""
    if not CYNORM_HAVE_VECTOR_TREES:
        return lanes_total(lanes, tail)
    if accumulator is float:
        return cynorm_lanes_total_float(lanes, tail)
    else:
        return cynorm_lanes_total_double(lanes, tail)


cdef inline double head_mean(const floating* x, Py_ssize_t n) noexcept nogil:
    """Mean of the n first values, summed in double in TAIL_LANES lanes.  (Times 1/n, which is computed while
    the values are summed: a division after the sum held up the rest of a short row.)"""
    cdef double lanes[TAIL_LANES]
    cdef double rest = 0
    cdef Py_ssize_t i, step
    cdef int j
    for j in range(TAIL_LANES):
        lanes[j] = 0
    for step in range(n // TAIL_LANES):
        for j in range(TAIL_LANES):
            lanes[j] += x[step * TAIL_LANES + j]
    for i in range(n - n % TAIL_LANES, n):
        rest += x[i]
    return tail_lanes_total(lanes, rest) * (1.0 / n)


cdef inline double lanes_mean(const floating* x, Py_ssize_t m, accumulator precision) noexcept nogil:
    """Mean of m values, summed in `accumulator` lanes."""
    cdef accumulator s[LANES]
    cdef accumulator tail = 0
    cdef Py_ssize_t i, step, body = m - m % LANES
    cdef int j
    for j in range(LANES):
        s[j] = 0
    for step in range(body // LANES):
        i = step * LANES
        for j in range(LANES):
            s[j] += x[i + j]
    for i in range(body, m):
        tail += x[i]
    return lanes_total(s, tail) / m


cdef inline void centred_sums(const floating* x, Py_ssize_t m, accumulator centre,
                              double* sum_d, double* sum_d2) noexcept nogil:
    """OUT sums of d = x - centre and of d², in `accumulator` lanes."""
    cdef accumulator s1[LANES]
    cdef accumulator s2[LANES]
    cdef accumulator q1[TAIL_LANES]
    cdef accumulator q2[TAIL_LANES]
    cdef accumulator d, tail1, tail2, rest1 = 0, rest2 = 0
    cdef Py_ssize_t i, step, body = m - m % LANES, tail_body = m - m % TAIL_LANES
    cdef int j
    for j in range(TAIL_LANES):
        q1[j] = 0
        q2[j] = 0
    for step in range((tail_body - body) // TAIL_LANES):
        i = body + step * TAIL_LANES
        for j in range(TAIL_LANES):
            d = x[i + j] - centre
            q1[j] += d
            q2[j] += d * d
    for i in range(tail_body, m):
        d = x[i] - centre
        rest1 += d
        rest2 += d * d
    tail1 = tail_lanes_total(q1, rest1)
    tail2 = tail_lanes_total(q2, rest2)
    if body == 0:   # a short row: adding up lanes of zeros cost as much as the row
        sum_d[0] = tail1
        sum_d2[0] = tail2
        return
    # The first block sets the lanes: clearing them first compiled to `rep stos`, slow to start on every row.
    for j in range(LANES):
        d = x[j] - centre
        s1[j] = d
        s2[j] = d * d
    for step in range(1, body // LANES):
        i = step * LANES
        for j in range(LANES):
            d = x[i + j] - centre
            s1[j] += d
            s2[j] += d * d
    sum_d[0] = lanes_total(s1, tail1)
    sum_d2[0] = lanes_total(s2, tail2)


cdef inline void moments_in_lanes(const floating* x,      # IN (m,)
                                  Py_ssize_t m,
                                  bint centered,
                                  accumulator precision,   # selects the type the lanes sum in
                                  double* mean,            # OUT
                                  double* m2) noexcept nogil:  # OUT sum of squared deviations
    """Mean and M2 of m <= CHUNK cache-resident values, summed in lanes of the `accumulator` type.

    Deviations d from a centre near the mean are small, so their float sums stay accurate when
    |mean| >> std, and M2 = sum(d²) - sum(d)²/m corrects for the centre's own error.  The centre is the mean
    of the first LANES values; when it turns out far from the chunk's mean (relative to its spread) the
    correction would cancel digits, so the chunk is summed again around its full mean."""
    cdef accumulator centre = 0
    cdef double t1, t2
    cdef double inverse_m = 1.0 / m   # (computed while the values are summed, off the row's critical path)
    if centered:
        centre = <accumulator>head_mean(x, min(m, <Py_ssize_t>LANES))
    centred_sums(x, m, centre, &t1, &t2)
    if centered and t1 * t1 > 0.75 * m * t2:
        centre = <accumulator>lanes_mean(x, m, precision)
        centred_sums(x, m, centre, &t1, &t2)
    if centered:
        mean[0] = centre + t1 * inverse_m
        m2[0] = t2 - t1 * t1 * inverse_m
        if m2[0] < 0:   # written so that a NaN stays NaN
            m2[0] = 0
    else:
        mean[0] = 0
        m2[0] = t2


cdef inline void chunk_moments(const floating* x, Py_ssize_t m, bint centered,
                               double* mean, double* m2) noexcept nogil:  # OUT
    """Moments of a chunk in lanes of the input's precision; float lanes overflow once squares pass
    ~3e38, so such a chunk (or one holding a NaN or Inf) is summed again in double."""
    cdef floating same_precision = 0
    cdef double wide = 0
    moments_in_lanes(x, m, centered, same_precision, mean, m2)
    if floating is float:
        if not (isfinite(mean[0]) and isfinite(m2[0])):
            moments_in_lanes(x, m, centered, wide, mean, m2)


cdef inline void merge_moments(double* count, double* mean, double* m2,   # INOUT running moments
                               double block_count, double block_mean, double block_m2) noexcept nogil:
    """Chan et al.'s pairwise update: fold one block's moments into the running ones."""
    cdef double total = count[0] + block_count
    cdef double delta = block_mean - mean[0]
    mean[0] += delta * (block_count / total)
    m2[0] += block_m2 + delta * delta * (count[0] * block_count / total)
    count[0] = total


cdef inline double mean_beyond(double mean, floating mean_hi) noexcept nogil:
    """mean - mean_hi, where mean_hi is the mean rounded to the kernel's type: what the type cannot hold of it
    (0 in float64), which the kernels add back as a low part.  Computed past the compiler's sight of where
    mean_hi came from (see cynorm_mean_beyond_float)."""
    if floating is float:
        return cynorm_mean_beyond_float(mean, mean_hi)
    return mean - mean_hi


cdef inline double inverse_std(double m2, double count, double eps, bint centered) noexcept nogil:
    # A centred M2 past the float64 range (float64 values beyond ~1e154 from their mean; an infinite input makes
    # it NaN) leaves no rstd to compute: NaN, as torch gives on most shapes, where 1/sqrt(inf) would silently make
    # the group's outputs zeros.  (An RMS norm's sum of squares is infinite with an infinite input too: 0, as in
    # torch.)
    if centered and m2 == INFINITY:
        return NAN
    return 1.0 / sqrt(m2 / count + eps)


cdef inline void set_group_centres(const floating* x, Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t row_stride,
                                   Py_ssize_t groups,
                                   accumulator* column_sums,   # scratch (n_cols,)
                                   accumulator* centre) noexcept nogil:  # OUT (n_cols,) its group's mean
    """Each column's centre: the mean of its group over the first `rows` rows (`row_stride` values apart)."""
    cdef Py_ssize_t cols_per_group = n_cols // groups
    cdef Py_ssize_t a, col, g
    cdef const floating* row
    cdef double total
    cdef accumulator group_centre
    memset(column_sums, 0, n_cols * sizeof(accumulator))
    for a in range(rows):
        row = x + a * row_stride
        for col in range(n_cols):
            column_sums[col] += row[col]
    if cols_per_group == 1:   # a group per column (layer norm over a middle axis): the same, in one loop that
        # the compiler vectorizes (the general loops ran a division at a time)
        for col in range(n_cols):
            centre[col] = <accumulator>(<double>column_sums[col] / rows)
        return
    for g in range(groups):
        total = 0
        for col in range(g * cols_per_group, (g + 1) * cols_per_group):
            total += column_sums[col]
        group_centre = <accumulator>(total / (rows * cols_per_group))
        for col in range(g * cols_per_group, (g + 1) * cols_per_group):
            centre[col] = group_centre


cdef inline Py_ssize_t rows_ahead(Py_ssize_t row_bytes, Py_ssize_t ahead_bytes) noexcept nogil:
    """How many rows ahead a prefetch goes to be at least `ahead_bytes` ahead (at least one row)."""
    return max(1, ahead_bytes // max(row_bytes, 1))


cdef inline bint rows_one_at_a_time(Py_ssize_t row_bytes, Py_ssize_t readable_rows) noexcept nogil:
    """Whether the columns view's sums take rows of `row_bytes` one at a time rather than four: rows asked for
    ahead (up to `readable_rows`, 0 for none) of ROW_AT_A_TIME_AHEAD_FROM_BYTES or more."""
    return CYNORM_ROWS_AHEAD_ONE_AT_A_TIME and readable_rows > 0 and row_bytes >= ROW_AT_A_TIME_AHEAD_FROM_BYTES


cdef inline void repeat_columns(accumulator* values, Py_ssize_t n_cols,
                                Py_ssize_t width) noexcept nogil:   # INOUT (width,)
    """Repeats values[:n_cols] along the row up to `width` (a multiple of n_cols): the per-column arrays of rows
    taken several at a time (see WIDE_ROW)."""
    cdef Py_ssize_t col
    for col in range(n_cols, width):
        values[col] = values[col - n_cols]


cdef inline void repeat_group_columns(floating* values,   # INOUT (stride,)
                                      Py_ssize_t n_cols, Py_ssize_t stride,
                                      Py_ssize_t first_col, Py_ssize_t count) noexcept nogil:
    """Repeats values[first_col:first_col + count], one group's columns, every n_cols values up to `stride` (as
    repeat_columns does with a whole row; see constants_stride)."""
    cdef Py_ssize_t start = first_col + n_cols, col
    while start < stride:
        for col in range(start, min(start + count, stride)):
            values[col] = values[col - n_cols]
        start += n_cols


cdef inline bint tile_moments_around(const floating* x, Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t row_stride,
                                     Py_ssize_t groups, Py_ssize_t fold, bint centered,
                                     const accumulator* centre,   # IN (fold * n_cols,) each column's, `fold` times
                                     accumulator* s1, accumulator* s2,          # scratch (fold * n_cols,) each
                                     Py_ssize_t readable_rows,
                                     const unsigned char* only,   # IN (groups,): the groups to write, or NULL: all
                                     unsigned char* inaccurate,   # OUT (groups,): whether each is, or NULL
                                     double* out) noexcept nogil:   # OUT (groups, 2)
    """Per-group mean and M2 from sums of deviations from `centre`, as moments_in_lanes does for a chunk, over
    `rows` rows of n_cols values `row_stride` values apart (a block of a tile's columns when less than n_cols).
    Returns whether every centre was close enough to its group's mean for the result to be accurate.
    Rows ahead are prefetched up to row `readable_rows` of x (0: no prefetching).  The rows are taken `fold`
    at a time, as rows of fold * n_cols columns (see WIDE_ROW; only whole rows, row_stride == n_cols, fold), the
    rows left over one at a time.  Each column's sums are added row after row, whichever block of columns it is
    in: a group's results depend on its own columns only."""
    cdef Py_ssize_t cols_per_group = n_cols // groups
    cdef Py_ssize_t width = fold * n_cols, wide_stride = fold * row_stride, wide_rows = rows // fold
    cdef Py_ssize_t readable_wide_rows = readable_rows // fold
    cdef Py_ssize_t a, col, g, j, quad, c0, blk, block_width
    cdef Py_ssize_t ahead = rows_ahead(width * sizeof(floating), PREFETCH_AHEAD_BYTES)
    cdef Py_ssize_t quads = 0 if rows_one_at_a_time(width * sizeof(floating), readable_wide_rows) else wide_rows // 4
    cdef accumulator b1[COLUMN_BLOCK]
    cdef accumulator b2[COLUMN_BLOCK]
    cdef const floating* row
    cdef accumulator d, d0, d1, d2, d3, d4, d5, d6, d7
    cdef Py_ssize_t octs
    cdef double t1, t2, count = rows * cols_per_group
    cdef bint accurate = True, group_accurate
    cdef Py_ssize_t done = 0
    # The whole vectors of columns in registers, a strip of them over all the rows (cynorm_moments_strips):
    # the loops below load and store each column's sums every four rows, and waited on that (the statistics
    # alone of (8,3136,256) 1.23x faster, forwards on rows of 10-256 columns 1.07-1.15x).  Float sums of double
    # input (a float input's overflow, redone) are left to the loops.
    if floating is float and accumulator is float:
        done = cynorm_moments_strips_float(<const float*>x, wide_rows, width, wide_stride, readable_wide_rows,
                                           ahead, <const float*>centre, <float*>s1, <float*>s2)
    elif floating is double and accumulator is double:
        done = cynorm_moments_strips_double(<const double*>x, wide_rows, width, wide_stride, readable_wide_rows,
                                            ahead, <const double*>centre, <double*>s1, <double*>s2)
    # The columns left: four rows at a time, each column's sums still taken row after row (the same bits): a
    # quarter of the loads and stores of the sums, and of the loop's start-up per row (a forward on
    # (16,1024,64) 1.12-1.31x, (1,4096,512) 1.07x); wide rows asked for ahead, one at a time (see
    # rows_one_at_a_time).  The sums of COLUMN_BLOCK columns at a time are kept in local arrays, which no pointer
    # can reach, so the compiler vectorizes the loop without checking pointers for overlap every four rows
    # (forwards 1.02-1.06x, rows of 10 columns 1.39x).
    for blk in range((width - done + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        c0 = done + blk * COLUMN_BLOCK
        block_width = min(<Py_ssize_t>COLUMN_BLOCK, width - c0)
        for col in range(block_width):
            b1[col] = 0
            b2[col] = 0
        # Eight rows at a time where the rows are wide and not asked for ahead (so that they come from L3 or
        # memory at the hardware's pace): more of their loads in flight, and half the loads and stores of the
        # sums, each column's sums still added row after row (the same bits).  Channels-last GroupNorm forwards,
        # A/B on a Zen 3: (1,4096,512) 1.03-1.06x, (1,1024,1280) 1.05-1.08x, (4,4096,128) 1.03-1.04x,
        # (2,4096,320) 1.02x; rows of 64 values ran 0.95-0.96x, and rows asked for ahead ((8,3136,256)) 0.93-0.94x.
        octs = (wide_rows // 8 if CYNORM_MOMENTS_EIGHT_ROWS and width >= EIGHT_ROWS_FROM_WIDTH
                and readable_wide_rows == 0 else 0)
        for quad in range(0, 2 * octs, 2):
            row = x + 4 * quad * wide_stride + c0
            for col in range(block_width):
                d0 = row[col] - centre[c0 + col]
                d1 = row[wide_stride + col] - centre[c0 + col]
                d2 = row[2 * wide_stride + col] - centre[c0 + col]
                d3 = row[3 * wide_stride + col] - centre[c0 + col]
                d4 = row[4 * wide_stride + col] - centre[c0 + col]
                d5 = row[5 * wide_stride + col] - centre[c0 + col]
                d6 = row[6 * wide_stride + col] - centre[c0 + col]
                d7 = row[7 * wide_stride + col] - centre[c0 + col]
                b1[col] = (((((((b1[col] + d0) + d1) + d2) + d3) + d4) + d5) + d6) + d7
                b2[col] = ((((((((b2[col] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3) + d4 * d4) + d5 * d5)
                            + d6 * d6) + d7 * d7)
        for quad in range(2 * octs, quads):
            row = x + 4 * quad * wide_stride + c0
            if c0 == 0:   # (the first block asks for the rows ahead; past strips, they have asked already)
                for a in range(4 * quad, 4 * quad + 4):
                    if a + ahead < readable_wide_rows:
                        cynorm_prefetch_lines(x + (a + ahead) * wide_stride, width * sizeof(floating))
            for col in range(block_width):
                d0 = row[col] - centre[c0 + col]
                d1 = row[wide_stride + col] - centre[c0 + col]
                d2 = row[2 * wide_stride + col] - centre[c0 + col]
                d3 = row[3 * wide_stride + col] - centre[c0 + col]
                b1[col] = (((b1[col] + d0) + d1) + d2) + d3
                b2[col] = (((b2[col] + d0 * d0) + d1 * d1) + d2 * d2) + d3 * d3
        for a in range(4 * quads, wide_rows):
            row = x + a * wide_stride + c0
            if c0 == 0 and a + ahead < readable_wide_rows:
                cynorm_prefetch_lines(x + (a + ahead) * wide_stride, width * sizeof(floating))
            for col in range(block_width):
                d = row[col] - centre[c0 + col]
                b1[col] += d
                b2[col] += d * d
        for col in range(block_width):
            s1[c0 + col] = b1[col]
            s2[c0 + col] = b2[col]
    for a in range(wide_rows * fold, rows):
        row = x + a * row_stride
        for col in range(n_cols):
            d = row[col] - centre[col]
            s1[col] += d
            s2[col] += d * d
    for g in range(groups):
        if only != NULL and not only[g]:
            continue
        t1 = 0
        t2 = 0
        for j in range(fold):
            for col in range(j * n_cols + g * cols_per_group, j * n_cols + (g + 1) * cols_per_group):
                t1 += s1[col]
                t2 += s2[col]
        if centered:
            group_accurate = not (t1 * t1 > 0.75 * count * t2)
            accurate = accurate and group_accurate
            if inaccurate != NULL:
                inaccurate[g] = not group_accurate
            out[2 * g] = centre[g * cols_per_group] + t1 / count
            out[2 * g + 1] = t2 - t1 * t1 / count
            if out[2 * g + 1] < 0:
                out[2 * g + 1] = 0
        else:
            out[2 * g] = 0
            out[2 * g + 1] = t2
    return accurate


cdef inline Py_ssize_t tile_moments_scratch(Py_ssize_t fold, Py_ssize_t n_cols, Py_ssize_t groups) noexcept nogil:
    """The doubles of scratch that tile_moments takes, in whole lines."""
    return whole_lines((3 * fold * n_cols + 2 * groups) * sizeof(double) + 2 * groups) // sizeof(double)


cdef inline void tile_moments_in(const floating* x,       # IN (rows, row_stride), columns [0, n_cols) of it
                                 Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t row_stride, Py_ssize_t groups,
                                 Py_ssize_t fold, bint centered,
                                 accumulator* scratch,     # 3 * fold * n_cols
                                 unsigned char* redo,      # scratch (groups,)
                                 Py_ssize_t readable_rows,
                                 double* out) noexcept nogil:  # OUT (groups, 2): mean, M2 of each column group
    """Columns view: moments of each group of consecutive columns over a tile of rows, vectorized across
    columns (`fold` rows at a time, see tile_moments_around).  Centres come from the tile's first rows, or, for
    a group whose first rows were unrepresentative, from the whole tile.  `readable_rows` as in
    tile_moments_around."""
    cdef Py_ssize_t width = fold * n_cols
    cdef accumulator* centre = scratch
    cdef accumulator* s1 = scratch + width
    cdef accumulator* s2 = scratch + 2 * width
    if not centered:
        memset(centre, 0, width * sizeof(accumulator))
        tile_moments_around(x, rows, n_cols, row_stride, groups, fold, centered, centre, s1, s2, readable_rows,
                            NULL, NULL, out)
        return
    set_group_centres(x, min(rows, <Py_ssize_t>HEAD_ROWS), n_cols, row_stride, groups, s1, centre)
    repeat_columns(centre, n_cols, width)
    if not tile_moments_around(x, rows, n_cols, row_stride, groups, fold, centered, centre, s1, s2,
                               readable_rows, NULL, redo, out):
        set_group_centres(x, rows, n_cols, row_stride, groups, s1, centre)
        repeat_columns(centre, n_cols, width)
        tile_moments_around(x, rows, n_cols, row_stride, groups, fold, centered, centre, s1, s2, 0, redo, NULL,
                            out)


cdef inline void tile_moments(const floating* x, Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t row_stride,
                              Py_ssize_t groups, Py_ssize_t fold, bint centered,
                              double* scratch,   # tile_moments_scratch(fold, n_cols, groups)
                              Py_ssize_t readable_rows, double* out) noexcept nogil:
    """tile_moments_in with float sums for float input, a group's redone in double if they overflow (as
    chunk_moments)."""
    cdef double* redone = scratch + 3 * fold * n_cols                    # (groups, 2)
    cdef unsigned char* redo = <unsigned char*>(redone + 2 * groups)     # (groups,)
    cdef unsigned char* overflowed = redo + groups                       # (groups,)
    cdef Py_ssize_t g
    cdef bint any_overflowed = False
    if floating is double:
        tile_moments_in(x, rows, n_cols, row_stride, groups, fold, centered, scratch, redo, readable_rows, out)
        return
    tile_moments_in(x, rows, n_cols, row_stride, groups, fold, centered, <float*>scratch, redo, readable_rows,
                    out)
    for g in range(groups):
        overflowed[g] = not (isfinite(out[2 * g]) and isfinite(out[2 * g + 1]))
        any_overflowed = any_overflowed or overflowed[g]
    if any_overflowed:
        tile_moments_in(x, rows, n_cols, row_stride, groups, fold, centered, scratch, redo, 0, redone)
        for g in range(groups):
            if overflowed[g]:
                out[2 * g] = redone[2 * g]
                out[2 * g + 1] = redone[2 * g + 1]


cdef inline Py_ssize_t rows_per_tile(Py_ssize_t n_rows, Py_ssize_t n_cols) noexcept nogil:
    cdef Py_ssize_t most = min(<Py_ssize_t>MAX_TILE_ROWS, max(<Py_ssize_t>MIN_TILE_ROWS, TILE_ELEMS // max(n_cols, 1)))
    cdef Py_ssize_t tiles = (n_rows + most - 1) // most
    if tiles > 1:
        tiles = min(n_rows, (tiles + TILE_MULTIPLE - 1) // TILE_MULTIPLE * TILE_MULTIPLE)
    return max(1, (n_rows + tiles - 1) // max(tiles, 1))


cdef inline Py_ssize_t samples_per_batch(Py_ssize_t sample_size) noexcept nogil:
    return max(1, BATCH_ELEMS // max(sample_size, 1))


cdef inline Py_ssize_t first_sample_of(Py_ssize_t part, Py_ssize_t n_samples, Py_ssize_t parts) noexcept nogil:
    """The first of the consecutive samples of part `part` of `parts` (a thread's, see columns_forward)."""
    return n_samples * part // parts


cdef inline Py_ssize_t samples_ahead(Py_ssize_t part, Py_ssize_t sample_bytes) noexcept nogil:
    """How many samples part `part` reads ahead of those it writes: one in odd parts once a sample (the arrays a
    pass reads of it) outgrows STAGGER_FROM_BYTES, else none (see columns_forward)."""
    return 1 if part % 2 == 1 and sample_bytes >= STAGGER_FROM_BYTES else 0


# ---------------------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------------------

cdef inline void stream_copy(floating* dst, const floating* src, Py_ssize_t n) noexcept nogil:
    """A piece streamed on its own: the columns view's tiles, whose blocks are assembled on the output's lines
    (only a tile's two end lines take ordinary stores), and long rows' slabs, which no other piece of the
    thread's continues.  Rows, which end mid-line, go through the thread's writer (stream_put)."""
    if floating is float:
        cynorm_stream_floats(dst, src, n)
    else:
        cynorm_stream_doubles(dst, src, n)


cdef inline void stream_put(cynorm_stream_writer* writer, floating* dst, const floating* src,
                            Py_ssize_t n) noexcept nogil:
    """stream_copy through the thread's writer (see cynorm_stream_writer)."""
    if floating is float:
        cynorm_stream_writer_floats_put(writer, dst, src, n)
    else:
        cynorm_stream_writer_doubles_put(writer, dst, src, n)


cdef inline cynorm_stream_writer* thread_writer(char* writers, int thread) noexcept nogil:
    """Thread `thread`'s writer, emptied, among `writers` (WRITER_BYTES each, on lines of their own)."""
    cdef cynorm_stream_writer* writer = <cynorm_stream_writer*>(writers + thread * WRITER_BYTES)
    cynorm_stream_writer_open(writer)
    return writer


cdef inline void stream_flush(cynorm_stream_writer* writer, floating* output) noexcept nogil:
    """Writes the values of `output` that the writer holds (where they go, it knows)."""
    if floating is float:
        cynorm_stream_writer_floats_flush(writer)
    else:
        cynorm_stream_writer_doubles_flush(writer)


cdef inline Py_ssize_t streamed_block_end(const floating* y, Py_ssize_t block, Py_ssize_t stop) noexcept nogil:
    """End of the streamed block of y starting at `block`: STREAM_BLOCK values, less those before the block in
    its cache line, so that every block after the first starts on a line."""
    return min(block + STREAM_BLOCK - cynorm_values_past_line(y + block, sizeof(floating)), stop)


cdef inline floating* staged_block(floating* space,   # STREAM_BLOCK + STAGING_SLACK values
                                   Py_ssize_t start, Py_ssize_t stop, Py_ssize_t width) noexcept nogil:
    """Where in `space` the columns view assembles the streamed block [start, stop) of a tile of rows of `width`
    values: placed so that the rows starting in the block start on a vector boundary, where their vectorized
    loops store (else the block's start).  The block starts on a line of the output; the rows do not when the
    output starts 16 bytes past a line, as NumPy's large arrays do, and then their vector stores fell across the
    buffer's vector boundaries.  In about one process in five, a channels-last GroupNorm (8,3136,256) forward
    into such an output ran 2.2-2.6 ms against 0.9-1.4 ms into one that starts a line; placed, 1.0-1.4 ms in
    those processes."""
    cdef Py_ssize_t first_row = (width - start % width) % width
    return space + cynorm_values_to_vector(space + (first_row if first_row < stop - start else 0), sizeof(floating))


cdef inline Py_ssize_t values_before_vector(const floating* output) noexcept nogil:
    """How many values a loop writes before `output` reaches a boundary of the build's vectors: loops over
    consecutive values take these apart, so that the rest store whole aligned vectors.  NumPy starts large arrays
    16 bytes into a cache line, the input and the output alike, and the compiler's vector loops, run from the
    first value, then loaded and stored vectors across line boundaries.  On such arrays, with the values taken
    apart, the NumPy API's channels-first GroupNorm forwards of 4-8 MiB ran 1.03-1.10x faster ((1,512,64,64)
    1.09-1.10x) and its backwards that are not streamed 1.04-1.07x (the rows view's loops over a channel), and
    its channels-last forwards of 4-10 MiB 1.17-1.23x (normalize_tile_rows), on an AVX-512 Xeon, A/B in one
    process; on aligned arrays, or an aligned output, as fast as before.  (The x86-64-v3 build there: the rows
    view 1.02-1.08x; the columns view's rows of 64-512 values, which its vectors of 32 bytes take as fast
    misaligned, 0.94-1.03x, so its rows are left whole.)  The same operations on each value: the same bits."""
    return cynorm_values_to_vector(output, sizeof(floating))


cdef inline void normalize_values(const floating* x, floating* y,   # IN, OUT: n consecutive values of a row
                                  Py_ssize_t n, Py_ssize_t first,  # x[0] is element `first` of the row
                                  Py_ssize_t inner,
                                  const floating* weight, const floating* bias,  # the row's channels
                                  double mean, double rstd) noexcept nogil:
    """y = (x - mean) * rstd * weight[c] + bias[c], where channel c holds `inner` consecutive elements."""
    # float32 cannot hold a large mean exactly: it is subtracted as a high part, the low part goes into the
    # shift.
    cdef floating mean_hi = <floating>mean
    cdef floating mean_lo = <floating>mean_beyond(mean, mean_hi)
    cdef floating rs = <floating>rstd
    cdef floating scale, shift
    cdef Py_ssize_t i, c, start, stop, body
    if inner == 1:
        for i in range(n):
            y[i] = ((x[i] - mean_hi) - mean_lo) * rs * weight[first + i] + bias[first + i]
        return
    for c in range(first // inner, (first + n + inner - 1) // inner):
        scale = <floating>(rstd * weight[c])
        shift = <floating>(bias[c] - mean_lo * (rstd * weight[c]))
        start = max(first, c * inner) - first
        stop = min(first + n, (c + 1) * inner) - first
        # (the values before y's first vector boundary in a loop of their own: see values_before_vector)
        body = min(start + values_before_vector(y + start), stop)
        for i in range(start, body):
            y[i] = (x[i] - mean_hi) * scale + shift
        for i in range(body, stop):
            y[i] = (x[i] - mean_hi) * scale + shift


cdef inline void normalize_short_row(const floating* x, floating* y,   # IN, OUT (length,): a row
                                     Py_ssize_t length, Py_ssize_t inner,  # of at most SHORT_ROW values
                                     const floating* weight, const floating* bias,  # the row's channels
                                     double mean, double rstd) noexcept nogil:
    """normalize_values on a whole short row of channels of inner > 1 values, with the same operations: each
    channel's scale and shift first, in a loop over the channels that the compiler vectorizes, then spread to
    their values, then the values in one loop.  Against a channel at a time (its constants in scalar double
    arithmetic, then a loop of `inner` values), channels-first GroupNorm forwards ran 1.06-1.28x faster on rows of
    4-16 channels of 3-6 values ((64,512,2,2) 1.26x, (64,128,4) 1.06x; A/B in one process, Zen 3, the same bits),
    as fast on channels of 8-16 values, and 0.90-1.01x as fast on rows of 1-2 channels or of channels of 2 values,
    which keep normalize_values."""
    cdef floating channel_scale[SHORT_ROW]
    cdef floating channel_shift[SHORT_ROW]
    cdef floating scale[SHORT_ROW]
    cdef floating shift[SHORT_ROW]
    cdef floating mean_hi = <floating>mean
    cdef floating mean_lo = <floating>mean_beyond(mean, mean_hi)
    cdef Py_ssize_t channels = length // inner, c, i
    for c in range(channels):
        channel_scale[c] = <floating>(rstd * weight[c])
        channel_shift[c] = <floating>(bias[c] - mean_lo * (rstd * weight[c]))
    for c in range(channels):
        for i in range(c * inner, (c + 1) * inner):
            scale[i] = channel_scale[c]
            shift[i] = channel_shift[c]
    for i in range(length):
        y[i] = (x[i] - mean_hi) * scale[i] + shift[i]


cdef inline void normalize_row_range(const floating* x, floating* y,   # IN, OUT: one row
                                     Py_ssize_t start, Py_ssize_t stop, Py_ssize_t inner,
                                     const floating* weight, const floating* bias,  # the row's channels
                                     double mean, double rstd, bint stream,
                                     const floating* next_row,     # IN or NULL
                                     const floating* next_output,  # that row of y (only asked for), or NULL
                                     cynorm_stream_writer* writer) noexcept nogil:   # the thread's, if `stream`
    """Normalizes elements [start, stop) of a row, with streaming stores through `writer` if `stream`.  The
    caller flushes the writer and fences the streamed stores once, after its last row: a fence per row costs a
    memory round trip, which on short rows (layer norm over 768 values) measured slower than not streaming at
    all.

    `next_row`, a row the thread normalizes later, is prefetched block by block meanwhile.  This pass reads
    the row from L2, where its statistics left it, so without the prefetch the memory would idle during it and
    the next row's statistics would wait on every line: forwards of 8-25 MB ran 1.24-1.34x faster with it.
    `next_output`, that row's output (when not streamed), likewise, so that its stores do not each wait for
    their line: layer norm (4096,768) forwards 1.09-1.15x faster than with the input's rows alone (Zen 3)."""
    cdef floating buffer[STREAM_BLOCK]
    cdef Py_ssize_t block = start, end
    if not stream and next_row == NULL and next_output == NULL:
        normalize_values(x + start, y + start, stop - start, start, inner, weight, bias, mean, rstd)
        return
    while block < stop:
        end = streamed_block_end(y, block, stop) if stream else min(block + STREAM_BLOCK, stop)
        if next_row != NULL:
            cynorm_prefetch_lines(next_row + block, (end - block) * sizeof(floating))
        if next_output != NULL:
            cynorm_prefetch_lines(next_output + block, (end - block) * sizeof(floating))
        if stream:
            normalize_values(x + block, buffer, end - block, block, inner, weight, bias, mean, rstd)
            stream_put(writer, y + block, buffer, end - block)
        else:
            normalize_values(x + block, y + block, end - block, block, inner, weight, bias, mean, rstd)
        block = end


cdef inline void gather_rows(const floating* x, Py_ssize_t row_stride, Py_ssize_t count, Py_ssize_t length,
                             floating* lanes) noexcept nogil:   # OUT (length, ROW_BLOCK)
    """lanes[j, k] = element j of row k, the row at x + k * row_stride, for `count` <= ROW_BLOCK rows; the lanes
    past them repeat the first row (finite wherever it is).  Element j of every row at once, from the rows'
    offsets: the compiler assembles the ROW_BLOCK values with shuffles and stores them as vectors (a row at a
    time, it stored one value at a time; layer norm forward on rows of 32-64 values 1.34-1.47x, of 10 1.15x)."""
    cdef Py_ssize_t j
    cdef int k
    cdef Py_ssize_t offsets[ROW_BLOCK]
    for k in range(ROW_BLOCK):
        offsets[k] = (k if k < count else 0) * row_stride
    for j in range(length):
        for k in range(ROW_BLOCK):
            lanes[j * ROW_BLOCK + k] = x[offsets[k] + j]


cdef inline void lane_sums(const floating* a, const floating* b,   # IN (length, ROW_BLOCK), may be the same
                           Py_ssize_t length, const floating* centre,  # IN (ROW_BLOCK,)
                           floating* s1, floating* s2) noexcept nogil:   # OUT (ROW_BLOCK,) each
    """Per lane: s1 = sum(a - centre), s2 = sum((a - centre) * (b - centre)), each from four partial sums
    along the row (element j into partial j % 4) added in a fixed tree."""
    cdef floating p1[4 * ROW_BLOCK]
    cdef floating p2[4 * ROW_BLOCK]
    cdef floating d
    cdef Py_ssize_t j
    cdef int k, q
    for k in range(4 * ROW_BLOCK):
        p1[k] = 0
        p2[k] = 0
    for j in range(length):
        q = (j % 4) * ROW_BLOCK
        for k in range(ROW_BLOCK):
            d = a[j * ROW_BLOCK + k] - centre[k]
            p1[q + k] += d
            p2[q + k] += d * (b[j * ROW_BLOCK + k] - centre[k])
    for k in range(ROW_BLOCK):
        s1[k] = (p1[k] + p1[2 * ROW_BLOCK + k]) + (p1[ROW_BLOCK + k] + p1[3 * ROW_BLOCK + k])
        s2[k] = (p2[k] + p2[2 * ROW_BLOCK + k]) + (p2[ROW_BLOCK + k] + p2[3 * ROW_BLOCK + k])


cdef inline void block_moments(const floating* lanes,   # IN (length, ROW_BLOCK), a row per lane
                               Py_ssize_t length, bint centered,
                               double* mean, double* m2) noexcept nogil:   # OUT (ROW_BLOCK,) each
    """Mean and M2 of each lane.  A first pass gives each lane's mean, the centre of the second; the sum of the
    deviations from it corrects M2 for the centre's rounding (the corrected two-pass algorithm), so the sums
    stay accurate in the input's precision when |mean| >> std."""
    cdef floating centre[ROW_BLOCK]
    cdef floating s1[ROW_BLOCK]
    cdef floating s2[ROW_BLOCK]
    cdef int k
    for k in range(ROW_BLOCK):
        centre[k] = 0
    lane_sums(lanes, lanes, length, centre, s1, s2)
    if not centered:
        for k in range(ROW_BLOCK):
            mean[k] = 0
            m2[k] = s2[k]
        return
    for k in range(ROW_BLOCK):
        centre[k] = s1[k] / length
    lane_sums(lanes, lanes, length, centre, s1, s2)
    for k in range(ROW_BLOCK):
        mean[k] = centre[k] + <double>s1[k] / length
        m2[k] = s2[k] - <double>s1[k] * s1[k] / length
        if m2[k] < 0:   # written so that a NaN stays NaN
            m2[k] = 0


cdef inline void short_rows_forward(const floating* x, floating* y,   # IN, OUT (n_rows, length)
                                    Py_ssize_t first_row, Py_ssize_t count, Py_ssize_t length,
                                    Py_ssize_t groups, Py_ssize_t chans_per_group, Py_ssize_t inner,
                                    const floating* weight, const floating* bias,
                                    double* mean, double* rstd,   # OUT [first_row, first_row + count)
                                    double eps, bint centered, bint stream,
                                    cynorm_stream_writer* writer) noexcept nogil:   # the thread's, if `stream`
    """Forward of `count` <= ROW_BLOCK consecutive rows of at most SHORT_ROW values: the statistics of all of
    them at once (block_moments), then each row normalized.  Streamed, the rows are assembled in L1 and stored
    as one piece through `writer`, since rows streamed one by one start anywhere in a cache line."""
    cdef floating lanes[ROW_BLOCK * SHORT_ROW]
    cdef double lane_mean[ROW_BLOCK]
    cdef double lane_m2[ROW_BLOCK]
    cdef double lane_rstd[ROW_BLOCK]
    cdef floating* out
    cdef Py_ssize_t r, first_channel
    cdef int k
    cdef bint by_channel = inner >= 3 and length >= 4 * inner   # (see normalize_short_row)
    gather_rows(x + first_row * length, length, count, length, lanes)
    block_moments(lanes, length, centered, lane_mean, lane_m2)
    if floating is float:
        # float sums overflow once squares pass ~3e38: such a row is summed again by row_moments, in double
        for k in range(count):
            if not (isfinite(lane_mean[k]) and isfinite(lane_m2[k])):
                lane_m2[k] = row_moments(x + (first_row + k) * length, length, centered, &lane_mean[k])
    for k in range(ROW_BLOCK):
        lane_rstd[k] = inverse_std(lane_m2[k], length, eps, centered)
    out = &lanes[0] if stream else y + first_row * length   # (the lanes are free again)
    for k in range(count):
        r = first_row + k
        mean[r] = lane_mean[k]
        rstd[r] = lane_rstd[k]
        first_channel = (r % groups) * chans_per_group
        if not by_channel:
            normalize_values(x + r * length, out + k * length, length, 0, inner, &weight[first_channel],
                             &bias[first_channel], lane_mean[k], lane_rstd[k])
        else:
            normalize_short_row(x + r * length, out + k * length, length, inner, &weight[first_channel],
                                &bias[first_channel], lane_mean[k], lane_rstd[k])
    if stream:
        stream_put(writer, y + first_row * length, lanes, count * length)


cdef inline double row_moments(const floating* x, Py_ssize_t length, bint centered,
                               double* mean) noexcept nogil:
    """Mean (OUT) and returned M2 of a contiguous row: CHUNK-sized blocks merged in order, exactly as the
    chunk-parallel path merges them."""
    cdef double count = 0, running_mean = 0, running_m2 = 0, chunk_mean, chunk_m2
    cdef Py_ssize_t k, m
    for k in range((length + CHUNK - 1) // CHUNK):
        m = min(<Py_ssize_t>CHUNK, length - k * CHUNK)
        chunk_moments(x + k * CHUNK, m, centered, &chunk_mean, &chunk_m2)
        merge_moments(&count, &running_mean, &running_m2, m, chunk_mean, chunk_m2)
    mean[0] = running_mean
    return running_m2


cdef inline void normalize_tile_row(const floating* x, floating* y, Py_ssize_t n,   # IN, OUT (n,)
                                    const floating* mean_hi,                       # (n,) per column
                                    const floating* scale, const floating* shift,  # (n,) per column
                                    bint affine_per_row, floating w, floating b) noexcept nogil:
    cdef Py_ssize_t col
    if affine_per_row:
        for col in range(n):
            y[col] = ((x[col] - mean_hi[col]) * scale[col] + shift[col]) * w + b
    else:
        for col in range(n):
            y[col] = (x[col] - mean_hi[col]) * scale[col] + shift[col]


cdef inline void normalize_four_rows(const floating* x0, floating* y0,   # IN, OUT: rows k at k * row_stride
                                     Py_ssize_t row_stride, Py_ssize_t start, Py_ssize_t stop,   # columns
                                     const floating* m, const floating* sc,
                                     const floating* sh) noexcept nogil:   # IN per column
    """normalize_tile_row's values of columns [start, stop) of four rows, each column's constants loaded once."""
    cdef Py_ssize_t col
    for col in range(start, stop):
        y0[col] = (x0[col] - m[col]) * sc[col] + sh[col]
        y0[row_stride + col] = (x0[row_stride + col] - m[col]) * sc[col] + sh[col]
        y0[2 * row_stride + col] = (x0[2 * row_stride + col] - m[col]) * sc[col] + sh[col]
        y0[3 * row_stride + col] = (x0[3 * row_stride + col] - m[col]) * sc[col] + sh[col]


cdef inline void normalize_tile_rows(const floating* x, floating* y,   # IN, OUT (rows, row_stride), the first
                                     Py_ssize_t rows, Py_ssize_t width,      # `width` values of each row
                                     Py_ssize_t row_stride,
                                     const floating* mean_hi, const floating* scale,
                                     const floating* shift) noexcept nogil:   # IN (width,) per column
    """normalize_tile_row on whole rows, from local copies of the columns' constants that y cannot overlap; in
    AVX-512 builds four rows at a time, each column's constants loaded once for the four (a row at a time made
    four loads for each value stored: channels-last GroupNorm forward (16,1024,64) 1.11x, (2,4096,320) 1.14x
    faster on a Zen 5).  Other builds take a row at a time: in AVX2 builds, four rows at once ran 0.88-0.96x as
    fast on a Zen 3 ((1,4096,512), (2,4096,320), (8,1024,64), (32,676,32); the same bits either way)."""
    cdef floating m[COLUMN_BLOCK]
    cdef floating sc[COLUMN_BLOCK]
    cdef floating sh[COLUMN_BLOCK]
    cdef Py_ssize_t blk, c0, block_width, col, quad, a, body
    cdef Py_ssize_t quads = rows // 4 if CYNORM_NORMALIZE_ROW_QUADS else 0   # fours of rows taken together
    cdef bint rows_in_step = (row_stride * <Py_ssize_t>sizeof(floating)) % CYNORM_LINE_BYTES == 0
    cdef const floating* x0
    cdef floating* y0
    for blk in range((width + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
        c0 = blk * COLUMN_BLOCK
        block_width = min(<Py_ssize_t>COLUMN_BLOCK, width - c0)
        for col in range(block_width):
            m[col] = mean_hi[c0 + col]
            sc[col] = scale[c0 + col]
            sh[col] = shift[c0 + col]
        # (rows a multiple of a line apart all reach a vector boundary after as many values: see
        # values_before_vector)
        body = min(values_before_vector(y + c0), block_width) if rows_in_step else 0
        for quad in range(quads):
            x0 = x + 4 * quad * row_stride + c0
            y0 = y + 4 * quad * row_stride + c0
            normalize_four_rows(x0, y0, row_stride, 0, body, m, sc, sh)
            normalize_four_rows(x0, y0, row_stride, body, block_width, m, sc, sh)
        for a in range(4 * quads, rows):
            normalize_tile_row(x + a * row_stride + c0, y + a * row_stride + c0, block_width, m, sc, sh, False, 1,
                               0)


cdef inline void normalize_tile(const floating* x, floating* y,   # IN, OUT (values,)
                                Py_ssize_t values, Py_ssize_t width,   # rows of `width` values, the last perhaps
                                const floating* mean_hi,               # cut short; per column (see
                                const floating* scale, const floating* shift,  # constants_stride)
                                bint affine_per_row,
                                const floating* row_weight, const floating* row_bias,  # (rows,) if affine_per_row
                                bint stream) noexcept nogil:
    """Normalizes a tile, as rows of `width` values with per-column arrays of `width` values, then their first
    values again (a row of the tile, or several folded into one, see WIDE_ROW; constants_stride), with streaming
    stores if `stream`.  The tile is contiguous in y, so it is streamed a line of y at a time whatever the row
    length: from the registers (cynorm_normalize_tile_streamed), or, with a weight per row, in blocks assembled in
    a buffer from the pieces of the rows they span.  (Blocks that began anywhere in a line, a row or a part of a
    row at a time, ran 1.5-2.5x slower than line-aligned ones.)  The caller fences the streamed stores (see
    normalize_row_range)."""
    cdef floating space[STREAM_BLOCK + STAGING_SLACK]
    cdef floating* buffer
    cdef Py_ssize_t a, col, n, start, stop, position
    cdef floating w = 1, b = 0
    if not stream and not affine_per_row:
        normalize_tile_rows(x, y, values // width, width, width, mean_hi, scale, shift)
        a = values // width
        normalize_tile_row(x + a * width, y + a * width, values - a * width, mean_hi, scale, shift, False, w, b)
        return
    if not stream:
        # (whole rows with the width fixed, then the piece left, as columns_input_gradient)
        for a in range(values // width):
            if affine_per_row:
                w = row_weight[a]
                b = row_bias[a]
            normalize_tile_row(x + a * width, y + a * width, width, mean_hi, scale, shift, affine_per_row, w, b)
        a = values // width
        if values > a * width:
            if affine_per_row:
                w = row_weight[a]
                b = row_bias[a]
            normalize_tile_row(x + a * width, y + a * width, values - a * width, mean_hi, scale, shift,
                               affine_per_row, w, b)
        return
    if not affine_per_row:
        if floating is float:
            cynorm_normalize_tile_streamed_float(x, y, values, width, mean_hi, scale, shift)
        else:
            cynorm_normalize_tile_streamed_double(x, y, values, width, mean_hi, scale, shift)
        return
    start = 0
    while start < values:
        stop = streamed_block_end(y, start, values)
        buffer = staged_block(space, start, stop, width)
        position = start
        while position < stop:   # the pieces of rows in [start, stop)
            a = position // width
            col = position - a * width
            n = min(width - col, stop - position)
            if affine_per_row:
                w = row_weight[a]
                b = row_bias[a]
            normalize_tile_row(x + position, buffer + (position - start), n, mean_hi + col, scale + col,
                               shift + col, affine_per_row, w, b)
            position += n
        stream_copy(y + start, buffer, stop - start)
        start = stop


cdef struct Scratch:
    void* memory   # as malloc returned it
    char* next     # where the next piece starts, on a cache line


cdef inline Py_ssize_t whole_lines(Py_ssize_t nbytes) noexcept nogil:
    """`nbytes` rounded up to whole cache lines."""
    return (nbytes + CYNORM_LINE_BYTES - 1) // CYNORM_LINE_BYTES * CYNORM_LINE_BYTES


cdef int open_scratch(Scratch* scratch, Py_ssize_t nbytes) except -1:
    """Memory for a call's working arrays, `nbytes` of whole lines (see scratch_piece); the caller frees
    scratch.memory after its loops, which run without the GIL and cannot raise.  One malloc: the NumPy arrays and
    typed memoryviews it replaces (up to a dozen a call) cost the columns view's calls 20-25 µs each, and the rows
    view's backward 12 µs, once a kernel had swept the caches."""
    scratch.memory = malloc(nbytes + CYNORM_LINE_BYTES)
    if scratch.memory == NULL:
        raise MemoryError(f"cynorm kernels: no memory for {nbytes} bytes of working arrays")
    scratch.next = (<char*>scratch.memory
                    + (CYNORM_LINE_BYTES - <size_t>scratch.memory % CYNORM_LINE_BYTES) % CYNORM_LINE_BYTES)
    return 0


cdef inline void* scratch_piece(Scratch* scratch, Py_ssize_t nbytes, bint zeroed) noexcept nogil:
    """The next `nbytes` of the scratch memory, starting a cache line (zeros if `zeroed`).  Threads that write
    the same line take turns owning it, and a vector that straddles two lines is two accesses: where malloc
    happened to put such arrays (it aligns to 16 bytes), a layer norm backward on rows of 32 values ran 1.45x
    slower, and a channels-last GroupNorm backward on (16,1024,64) up to 1.56x."""
    cdef void* piece = scratch.next
    scratch.next += whole_lines(nbytes)
    if zeroed:
        memset(piece, 0, nbytes)
    return piece


def forward_rows(size_t x,          # IN  (n_rows * length,)
                 size_t y,          # OUT (n_rows * length,), may be x itself
                 size_t weight,     # IN  (groups * chans_per_group,)
                 size_t bias,       # IN  (groups * chans_per_group,)
                 size_t mean,       # OUT (n_rows,) float64
                 size_t rstd,       # OUT (n_rows,) float64
                 bint float64, Py_ssize_t n_rows, Py_ssize_t groups, Py_ssize_t chans_per_group,
                 Py_ssize_t inner, double eps, bint centered, bint stream, bint prefetch, int num_threads):
    """Rows view forward; row r uses channels (r % groups) * chans_per_group + [0, chans_per_group).
    `stream`: write y with streaming stores (for outputs too large to stay in cache); `prefetch`: ask for
    the rows ahead (for inputs too large to stay in cache)."""
    if float64:
        rows_forward(<const double*>x, <double*>y, <const double*>weight, <const double*>bias, <double*>mean,
                     <double*>rstd, n_rows, groups, chans_per_group, inner, eps, centered, stream, prefetch,
                     num_threads)
    else:
        rows_forward(<const float*>x, <float*>y, <const float*>weight, <const float*>bias, <double*>mean,
                     <double*>rstd, n_rows, groups, chans_per_group, inner, eps, centered, stream, prefetch,
                     num_threads)


cdef inline int rows4_forward(const floating* x, floating* y, Py_ssize_t length, const floating* weight,
                             const floating* bias, double eps, bint centered, double* mean, double* rstd,
                             const floating* next_x) noexcept nogil:
    """Four rows' statistics and values; a bit for each row left to the caller (float only: rows_forward takes
    double rows one at a time)."""
    if floating is float:
        return cynorm_rows4_forward_float(x, y, length, weight, bias, eps, centered, mean, rstd, next_x)
    return 15


cdef void rows_forward(const floating* x, floating* y, const floating* weight, const floating* bias,
                       double* mean, double* rstd, Py_ssize_t n_rows, Py_ssize_t groups,
                       Py_ssize_t chans_per_group, Py_ssize_t inner, double eps, bint centered, bint stream,
                       bint prefetch, int num_threads):
    cdef Py_ssize_t length = chans_per_group * inner
    cdef Py_ssize_t r, u, k, start, chunks, first_channel
    cdef double m2, count, running_mean
    cdef double* chunk_stats
    cdef Scratch memory
    cdef Py_ssize_t ahead = rows_ahead(length * sizeof(floating), ROWS_AHEAD_BYTES)
    cdef char* writers = NULL
    cdef cynorm_stream_writer* writer
    cdef bint by_rows, chunked
    # (the output's rows ahead too: see PREFETCHED_OUTPUT_MIN_ROW_BYTES)
    cdef bint prefetch_output = (prefetch and not stream and PREFETCHED_OUTPUT_MIN_ROW_BYTES
                                 <= length * <Py_ssize_t>sizeof(floating) <= PREFETCHED_OUTPUT_MAX_ROW_BYTES)
    # float rows of a multiple of 16 values four at a time (see CYNORM_FORWARD_QUAD_ROW)
    cdef bint quads = (floating is float and groups == 1 and inner == 1
                       and length > SHORT_ROW and length % 16 == 0 and length <= CYNORM_FORWARD_QUAD_ROW
                       and (length <= QUAD_STREAMED_ROW
                            or (not stream and n_rows * length < CYNORM_FORWARD_QUAD_VALUES)))
    cdef int refused
    if n_rows == 0 or length == 0:
        return
    by_rows = (n_rows % num_threads == 0 or n_rows >= 8 * num_threads
               or (n_rows > num_threads and length < 8 * CHUNK))
    chunks = (length + CHUNK - 1) // CHUNK
    chunked = length > SHORT_ROW and not quads and not by_rows
    if stream or chunked:
        open_scratch(&memory, num_threads * WRITER_BYTES
                     + (whole_lines(2 * n_rows * chunks * sizeof(double)) if chunked else 0))
        # each thread's stream writer, which takes the thread's rows (or pieces of rows) one after the other
        writers = <char*>scratch_piece(&memory, num_threads * WRITER_BYTES, False)
    if length <= SHORT_ROW:
        # (whatever the number of rows: a row's values must not depend on the rows around it)
        with nogil, parallel(num_threads=num_threads):
            writer = thread_writer(writers, threadid()) if stream else NULL
            for u in prange((n_rows + ROW_BLOCK - 1) // ROW_BLOCK, schedule="static"):
                short_rows_forward(x, y, u * ROW_BLOCK, min(<Py_ssize_t>ROW_BLOCK, n_rows - u * ROW_BLOCK), length,
                                   groups, chans_per_group, inner, weight, bias, mean, rstd, eps, centered, stream,
                                   writer)
            if stream:
                stream_flush(writer, y)
                cynorm_store_fence()
        if stream:
            free(memory.memory)
        return
    if quads:
        # (the rows the four-row kernel leaves, and those after the last four, one at a time as below)
        with nogil, parallel(num_threads=num_threads):
            for u in prange((n_rows + 3) // 4, schedule="static"):
                r = 4 * u
                refused = rows4_forward(&x[r * length], &y[r * length], length, weight, bias, eps, centered,
                                        &mean[r], &rstd[r], &x[(r + 4) * length] if r + 8 <= n_rows else NULL
                                        ) if r + 4 <= n_rows else 15
                for k in range(r, min(r + 4, n_rows)):
                    if refused & (1 << (k - r)):
                        m2 = row_moments(&x[k * length], length, centered, &mean[k])
                        rstd[k] = inverse_std(m2, length, eps, centered)
                        normalize_row_range(&x[k * length], &y[k * length], 0, length, inner, weight, bias, mean[k],
                                            rstd[k], False, NULL, NULL, NULL)
        if stream:   # (the four-row kernel does not stream: QUAD_STREAMED_ROW)
            free(memory.memory)
        return
    if by_rows:
        # One row per task: the row stays in cache between its statistics and its normalization.  A few long
        # rows that the threads cannot share evenly go to the chunks below, as rows much larger than L2 lose
        # nothing there (3 rows of 2**15-2**20 values 1.2-1.7x, 9 of 2**16 1.16x).
        with nogil, parallel(num_threads=num_threads):
            writer = thread_writer(writers, threadid()) if stream else NULL
            for r in prange(n_rows, schedule="static"):
                m2 = row_moments(&x[r * length], length, centered, &mean[r])
                rstd[r] = inverse_std(m2, length, eps, centered)
                first_channel = (r % groups) * chans_per_group
                # (with the static schedule a thread's rows are consecutive; its last ones prefetch in vain)
                normalize_row_range(&x[r * length], &y[r * length], 0, length, inner,
                                    &weight[first_channel], &bias[first_channel], mean[r], rstd[r], stream,
                                    &x[(r + ahead) * length] if prefetch and r + ahead < n_rows else NULL,
                                    &y[(r + ahead) * length] if prefetch_output and r + ahead < n_rows else NULL,
                                    writer)
            if stream:
                stream_flush(writer, y)
                cynorm_store_fence()
        if stream:
            free(memory.memory)
        return
    # Fewer rows than threads, or a few long ones: the same chunks, computed in parallel and merged in the same
    # order.
    chunk_stats = <double*>scratch_piece(&memory, 2 * n_rows * chunks * sizeof(double), False)
    with nogil:
        for u in prange(n_rows * chunks, num_threads=num_threads, schedule="static"):
            r = u // chunks
            start = (u % chunks) * CHUNK
            chunk_moments(&x[r * length + start], min(<Py_ssize_t>CHUNK, length - start), centered,
                          &chunk_stats[2 * u], &chunk_stats[2 * u + 1])
        for r in range(n_rows):
            count = 0
            running_mean = 0
            m2 = 0
            for k in range(chunks):
                u = r * chunks + k
                merge_moments(&count, &running_mean, &m2, min(<Py_ssize_t>CHUNK, length - k * CHUNK),
                              chunk_stats[2 * u], chunk_stats[2 * u + 1])
            mean[r] = running_mean
            rstd[r] = inverse_std(m2, length, eps, centered)
    with nogil, parallel(num_threads=num_threads):
        writer = thread_writer(writers, threadid())
        for u in prange(n_rows * chunks, schedule="static"):
            r = u // chunks
            start = (u % chunks) * CHUNK
            first_channel = (r % groups) * chans_per_group
            normalize_row_range(&x[r * length], &y[r * length], start, min(start + CHUNK, length), inner,
                                &weight[first_channel], &bias[first_channel], mean[r], rstd[r], stream, NULL, NULL,
                                writer)
        if stream:
            stream_flush(writer, y)
            cynorm_store_fence()
    free(memory.memory)


cdef inline Py_ssize_t rows_folded(Py_ssize_t n_cols) noexcept nogil:
    """How many rows of n_cols values the columns view takes as one (see WIDE_ROW): the fewest that make a
    multiple of WIDE_MULTIPLE values, doubled until they make WIDE_ROW."""
    cdef Py_ssize_t fold = 1
    if n_cols >= WIDE_ROW:
        return 1
    while (fold * n_cols) % WIDE_MULTIPLE:
        fold += 1
    while fold * n_cols < WIDE_ROW:
        fold *= 2
    return fold


cdef inline Py_ssize_t constants_stride(Py_ssize_t fold, Py_ssize_t n_cols, Py_ssize_t itemsize) noexcept nogil:
    """Values of the columns-view forward's normalization constants per sample: a row's (`fold` rows of
    n_cols), then its first values again, a cache line's worth (see cynorm_normalize_tile_streamed)."""
    return fold * n_cols + CYNORM_LINE_BYTES // itemsize


# The three steps of the columns-view forward, each on one unit: tile u is tile u % tiles of sample u // tiles,
# group s is group s % groups of sample s // groups.

cdef inline void columns_tile_moments(const floating* x,        # IN  (n_samples, n_rows, n_cols)
                                      Py_ssize_t u, Py_ssize_t tiles, Py_ssize_t tile_rows,
                                      Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups, Py_ssize_t fold,
                                      bint centered,
                                      bint prefetch,             # ask for the rows ahead, up to the sample's end
                                      double* scratch,           # tile_moments_scratch(fold, n_cols, groups)
                                      double* tile_stats) noexcept nogil:   # OUT tile_stats[u]: (groups, 2)
    cdef Py_ssize_t a0 = (u % tiles) * tile_rows
    tile_moments(x + ((u // tiles) * n_rows + a0) * n_cols, min(tile_rows, n_rows - a0), n_cols, n_cols, groups,
                 fold, centered, scratch, n_rows - a0 if prefetch else 0, tile_stats + 2 * u * groups)


cdef inline void columns_group_constants(const double* tile_stats,   # IN  (n_samples, tiles, groups, 2)
                                         Py_ssize_t s, Py_ssize_t tiles, Py_ssize_t tile_rows,
                                         Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                                         Py_ssize_t cols_per_channel, bint affine_per_row,
                                         const floating* weight, const floating* bias, double eps, bint centered,
                                         double* mean, double* rstd,   # OUT [s]
                                         Py_ssize_t fold, floating* mean_hi, floating* scale,
                                         floating* shift) noexcept nogil:  # OUT (n_samples, constants_stride)
    """Merges group s's tile moments in tile order and sets its columns' normalization constants, each column's
    `fold` times, and again where the row's first values repeat (see constants_stride)."""
    cdef Py_ssize_t n = s // groups, g = s % groups
    cdef Py_ssize_t cols_per_group = n_cols // groups, stride = constants_stride(fold, n_cols, sizeof(floating))
    cdef double count = 0, running_mean = 0, m2 = 0, mean_lo, column_scale
    cdef Py_ssize_t t, col, first = n * stride, run_end
    cdef Py_ssize_t start = first + g * cols_per_group, stop = start + cols_per_group
    cdef Py_ssize_t channel = g * cols_per_group // cols_per_channel   # column start's
    cdef floating group_mean_hi, column_shift
    for t in range(tiles):
        merge_moments(&count, &running_mean, &m2, min(tile_rows, n_rows - t * tile_rows) * cols_per_group,
                      tile_stats[2 * ((n * tiles + t) * groups + g)], tile_stats[2 * ((n * tiles + t) * groups + g) + 1])
    mean[s] = running_mean
    rstd[s] = inverse_std(m2, n_rows * cols_per_group, eps, centered)
    group_mean_hi = <floating>running_mean
    # the low part of the mean goes into the shift: y = (x - mean_hi) * scale + shift
    mean_lo = mean_beyond(running_mean, group_mean_hi)
    # (Each channel's constants are worked out once, without a division per column to find its channel: that
    # and the double arithmetic per column took 10 µs of a channels-last GroupNorm of 2560 channels on one thread.)
    if not affine_per_row and cols_per_channel == 1:   # a channel per column: a loop the compiler vectorizes
        for col in range(start, stop):
            column_scale = rstd[s] * weight[col - first]
            mean_hi[col] = group_mean_hi
            scale[col] = <floating>column_scale
            shift[col] = <floating>(bias[col - first] - mean_lo * column_scale)
    else:
        col = start
        while col < stop:   # a run of one channel's columns
            run_end = min(stop, first + (channel + 1) * cols_per_channel)
            if affine_per_row:
                column_scale = rstd[s]
                column_shift = <floating>(-mean_lo * column_scale)
            else:
                column_scale = rstd[s] * weight[channel]
                column_shift = <floating>(bias[channel] - mean_lo * column_scale)
            while col < run_end:
                mean_hi[col] = group_mean_hi
                scale[col] = <floating>column_scale
                shift[col] = column_shift
                col += 1
            channel += 1
    repeat_group_columns(mean_hi + first, n_cols, stride, g * cols_per_group, cols_per_group)
    repeat_group_columns(scale + first, n_cols, stride, g * cols_per_group, cols_per_group)
    repeat_group_columns(shift + first, n_cols, stride, g * cols_per_group, cols_per_group)


cdef inline void columns_normalize_tile(const floating* x, floating* y,   # IN, OUT (n_samples, n_rows, n_cols)
                                        Py_ssize_t u, Py_ssize_t tiles, Py_ssize_t tile_rows,
                                        Py_ssize_t n_rows, Py_ssize_t n_cols,
                                        Py_ssize_t fold, const floating* mean_hi, const floating* scale,
                                        const floating* shift,    # IN  (n_samples, constants_stride)
                                        bint affine_per_row, const floating* weight, const floating* bias,
                                        bint stream) noexcept nogil:
    cdef Py_ssize_t n = u // tiles, a0 = (u % tiles) * tile_rows
    cdef Py_ssize_t offset = (n * n_rows + a0) * n_cols, first = n * constants_stride(fold, n_cols, sizeof(floating))
    normalize_tile(x + offset, y + offset, min(tile_rows, n_rows - a0) * n_cols, fold * n_cols,
                   mean_hi + first, scale + first, shift + first, affine_per_row,
                   weight + a0 if affine_per_row else weight, bias + a0 if affine_per_row else bias, stream)


cdef inline Py_ssize_t group_blocks(Py_ssize_t n_samples, Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                                    Py_ssize_t tiles, Py_ssize_t itemsize, int num_threads) noexcept nogil:
    """Into how many blocks of whole column groups the columns-view forward cuts each sample (see
    GROUP_BLOCK_BYTES): the fewest of at most GROUP_BLOCK_BYTES, raised until the batch's blocks share out evenly
    between the threads (a block's bits do not depend on the cut: see columns_group_block_forward).  0 (the
    samples taken a tile at a time) for samples of several tiles, or of rows narrower than
    GROUP_BLOCKS_FROM_ROW_BYTES, or at least two a thread and smaller than GROUP_BLOCKS_FROM_SAMPLE_BYTES; where one
    block would hold the sample, or a group alone is larger, or a block's rows would be narrower than
    GROUP_BLOCK_MIN_ROW_BYTES."""
    cdef Py_ssize_t cols_per_group = n_cols // groups
    cdef Py_ssize_t most = GROUP_BLOCK_BYTES // max(n_rows * cols_per_group * itemsize, 1)   # groups a block
    cdef Py_ssize_t blocks
    if (tiles > 1 or n_cols * itemsize < GROUP_BLOCKS_FROM_ROW_BYTES
            or (n_samples >= 2 * num_threads and n_rows * n_cols * itemsize < GROUP_BLOCKS_FROM_SAMPLE_BYTES)
            or most == 0 or most >= groups):
        return 0
    blocks = (groups + most - 1) // most
    while (n_samples * blocks) % num_threads and blocks < groups:
        blocks += 1
    if groups // blocks * cols_per_group * itemsize < GROUP_BLOCK_MIN_ROW_BYTES:
        return 0
    return blocks


cdef inline void columns_group_block_forward(const floating* x, floating* y,   # IN, OUT (n_samples, n_rows, n_cols)
                                             Py_ssize_t u, Py_ssize_t blocks,
                                             Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                                             Py_ssize_t cols_per_channel,
                                             const floating* weight, const floating* bias, double eps,
                                             bint centered, bint prefetch,
                                             double* scratch,   # tile_moments_scratch(1, n_cols, groups)
                                             double* tile_stats,   # OUT (n_samples, groups, 2): a tile a sample
                                             double* mean, double* rstd,   # OUT (n_samples * groups,)
                                             floating* mean_hi, floating* scale,
                                             floating* shift) noexcept nogil:  # OUT (n_samples, constants_stride)
    """Block u % blocks of sample u // blocks (a sample of one tile, rows not folded): its column groups
    [g0, g1) over all the rows, their statistics, then their normalization, which finds the block in L2.  Each
    column's sums are added row after row, and each group's statistics come from its own columns (see
    tile_moments_around): the bits of the sample taken as a whole tile, however it is cut into blocks."""
    cdef Py_ssize_t n = u // blocks, g0 = (u % blocks) * groups // blocks, g1 = (u % blocks + 1) * groups // blocks
    cdef Py_ssize_t cols_per_group = n_cols // groups, c0 = g0 * cols_per_group
    cdef Py_ssize_t offset = n * n_rows * n_cols + c0   # of the block's first column, in x and y
    cdef Py_ssize_t constants = n * constants_stride(1, n_cols, sizeof(floating)) + c0   # and in the constants
    cdef Py_ssize_t width = (g1 - g0) * cols_per_group, s
    tile_moments(x + offset, n_rows, width, n_cols, g1 - g0, 1, centered, scratch, n_rows if prefetch else 0,
                 tile_stats + 2 * (n * groups + g0))
    for s in range(n * groups + g0, n * groups + g1):
        columns_group_constants(tile_stats, s, 1, n_rows, n_rows, n_cols, groups, cols_per_channel, False,
                                weight, bias, eps, centered, mean, rstd, 1, mean_hi, scale, shift)
    normalize_tile_rows(x + offset, y + offset, n_rows, width, n_cols, mean_hi + constants, scale + constants,
                        shift + constants)


def forward_columns(size_t x,        # IN  (n_samples * n_rows * n_cols,)
                    size_t y,        # OUT same, may be x itself
                    size_t weight,   # IN  (n_rows,) if affine_per_row else (n_cols // cols_per_channel,)
                    size_t bias,     # IN  same shape as weight
                    size_t mean,     # OUT (n_samples * groups,) float64
                    size_t rstd,     # OUT (n_samples * groups,) float64
                    bint float64, Py_ssize_t n_samples, Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                    Py_ssize_t cols_per_channel, bint affine_per_row, double eps, bint centered, bint stream,
                    bint prefetch, int num_threads):
    """Columns view forward: group g of sample n is columns [g, g+1) * n_cols/groups, reduced over rows.
    `stream` and `prefetch` as for forward_rows."""
    if float64:
        columns_forward(<const double*>x, <double*>y, <const double*>weight, <const double*>bias, <double*>mean,
                        <double*>rstd, n_samples, n_rows, n_cols, groups, cols_per_channel, affine_per_row, eps,
                        centered, stream, prefetch, num_threads)
    else:
        columns_forward(<const float*>x, <float*>y, <const float*>weight, <const float*>bias, <double*>mean,
                        <double*>rstd, n_samples, n_rows, n_cols, groups, cols_per_channel, affine_per_row, eps,
                        centered, stream, prefetch, num_threads)


cdef void columns_forward(const floating* x, floating* y, const floating* weight, const floating* bias,
                          double* mean, double* rstd, Py_ssize_t n_samples, Py_ssize_t n_rows, Py_ssize_t n_cols,
                          Py_ssize_t groups, Py_ssize_t cols_per_channel, bint affine_per_row, double eps,
                          bint centered, bint stream, bint prefetch, int num_threads):
    cdef Py_ssize_t tile_rows = rows_per_tile(n_rows, n_cols)
    cdef Py_ssize_t tiles = (n_rows + tile_rows - 1) // tile_rows
    cdef Py_ssize_t batch = samples_per_batch(n_rows * n_cols)
    cdef Py_ssize_t batch_index, first, batch_size, u, n, s, part, part_first, part_end, part_lead
    cdef Py_ssize_t part_rows = tile_rows, parts   # the normalization's parts of a sample
    # a tile's rows are taken `fold` at a time (see WIDE_ROW)
    cdef Py_ssize_t fold = 1 if affine_per_row else rows_folded(n_cols)
    # Blocks of column groups (see GROUP_BLOCK_BYTES), normalized a row's piece at a time, which streamed stores
    # do not take
    cdef Py_ssize_t blocks = (0 if stream or affine_per_row
                              else group_blocks(n_samples, n_rows, n_cols, groups, tiles, sizeof(floating),
                                                num_threads))
    cdef Py_ssize_t stats_bytes = 2 * n_samples * tiles * groups * sizeof(double)
    cdef Py_ssize_t column_bytes = n_samples * constants_stride(fold, n_cols, sizeof(floating)) * sizeof(floating)
    # each thread's tile_moments scratch, with room for double sums, which float input may need
    cdef Py_ssize_t scratch_stride = tile_moments_scratch(fold, n_cols, groups)
    cdef Scratch memory
    cdef double* tile_stats
    cdef floating* column_mean_hi
    cdef floating* column_scale
    cdef floating* column_shift
    cdef double* scratch
    if n_samples == 0 or n_rows == 0 or n_cols == 0:
        return
    open_scratch(&memory, whole_lines(stats_bytes) + 3 * whole_lines(column_bytes)
                 + num_threads * scratch_stride * sizeof(double))
    tile_stats = <double*>scratch_piece(&memory, stats_bytes, False)
    column_mean_hi = <floating*>scratch_piece(&memory, column_bytes, False)
    column_scale = <floating*>scratch_piece(&memory, column_bytes, False)
    column_shift = <floating*>scratch_piece(&memory, column_bytes, False)
    scratch = <double*>scratch_piece(&memory, num_threads * scratch_stride * sizeof(double), True)
    if blocks:
        # Each block's statistics and normalization on one thread, the blocks of all samples shared out: taken
        # as a tile, such a sample had its statistics on one thread, and was read for them from L3 and read again
        # from L3 to be normalized once it outgrew L2.
        with nogil, parallel(num_threads=num_threads):
            for u in prange(n_samples * blocks, schedule="static"):
                columns_group_block_forward(&x[0], &y[0], u, blocks, n_rows, n_cols, groups, cols_per_channel,
                                            &weight[0], &bias[0], eps, centered, prefetch,
                                            &scratch[threadid() * scratch_stride], tile_stats, &mean[0], &rstd[0],
                                            column_mean_hi, column_scale, column_shift)
        free(memory.memory)
        return
    if n_samples % num_threads == 0 or n_samples >= 8 * num_threads:
        # Whole samples per thread, a run of consecutive ones each, and no waiting on each other: each sample is
        # read for its statistics, then normalized while it is still in the last-level cache.  A pass that only
        # reads and one that mostly writes: in step, the threads would read together, then write together.
        # Odd threads run a sample ahead instead (read sample n+1, then write sample n), so that one thread's
        # reads meet the other's writes, when a sample outgrows L2 (smaller ones are normalized from L2, which
        # the sample read in between would evict).  The order of a sample's sums is unchanged: the same bits.
        # Channels-last GroupNorm forward A/B, in runs where memory was slow (a copy 2.5x its usual time):
        # (8,3136,256) 1.03-1.15x, (6,3136,256) 1.06-1.14x, (16,1024,256) 1.12x, (4,8192,256) 1.07-1.08x,
        # InstanceNorm (8,16384,64) 1.06x; where it was fast, 0.98-1.0x.  Samples of 256 KiB ran 0.96-0.98x.
        with nogil, parallel(num_threads=num_threads):
            for part in prange(num_threads, schedule="static", chunksize=1):
                part_first = first_sample_of(part, n_samples, num_threads)
                part_end = first_sample_of(part + 1, n_samples, num_threads)
                part_lead = samples_ahead(part, n_rows * n_cols * sizeof(floating))
                for n in range(part_first, part_end + part_lead):
                    if n < part_end:
                        for u in range(n * tiles, (n + 1) * tiles):
                            columns_tile_moments(&x[0], u, tiles, tile_rows, n_rows, n_cols, groups, fold,
                                                 centered, prefetch, &scratch[threadid() * scratch_stride],
                                                 tile_stats)
                        for s in range(n * groups, (n + 1) * groups):
                            columns_group_constants(tile_stats, s, tiles, tile_rows, n_rows, n_cols, groups,
                                                    cols_per_channel, affine_per_row, &weight[0], &bias[0], eps,
                                                    centered, &mean[0], &rstd[0], fold, column_mean_hi,
                                                    column_scale, column_shift)
                    if n - part_lead >= part_first:
                        for u in range((n - part_lead) * tiles, (n - part_lead + 1) * tiles):
                            columns_normalize_tile(&x[0], &y[0], u, tiles, tile_rows, n_rows, n_cols, fold,
                                                   column_mean_hi, column_scale, column_shift,
                                                   affine_per_row, &weight[0], &bias[0], stream)
            if stream:
                cynorm_store_fence()
        free(memory.memory)
        return
    # A sample of fewer tiles than threads is normalized in more parts, one per thread: the values do not depend
    # on how the rows are shared, unlike the statistics' sums.  (dx in parts, the same way, measured no faster:
    # one-sample backwards of one tile 0.98-1.05x.)
    if tiles * min(batch, n_samples) < num_threads:
        part_rows = (n_rows + num_threads - 1) // num_threads
    parts = (n_rows + part_rows - 1) // part_rows
    with nogil, parallel(num_threads=num_threads):
        # A batch of samples is normalized right after its statistics, while it is still in the last-level
        # cache; every thread walks the same batches.
        for batch_index in range((n_samples + batch - 1) // batch):
            first = batch_index * batch
            batch_size = min(batch, n_samples - first)
            for u in prange(first * tiles, (first + batch_size) * tiles, schedule="static"):
                columns_tile_moments(&x[0], u, tiles, tile_rows, n_rows, n_cols, groups, fold, centered, prefetch,
                                     &scratch[threadid() * scratch_stride], tile_stats)
            for s in prange(first * groups, (first + batch_size) * groups, schedule="static"):
                columns_group_constants(tile_stats, s, tiles, tile_rows, n_rows, n_cols, groups,
                                        cols_per_channel, affine_per_row, &weight[0], &bias[0], eps, centered,
                                        &mean[0], &rstd[0], fold, column_mean_hi, column_scale,
                                        column_shift)
            for u in prange(first * parts, (first + batch_size) * parts, schedule="static"):
                columns_normalize_tile(&x[0], &y[0], u, parts, part_rows, n_rows, n_cols, fold, column_mean_hi,
                                       column_scale, column_shift, affine_per_row, &weight[0],
                                       &bias[0], stream)
        if stream:
            cynorm_store_fence()
    free(memory.memory)


# ---------------------------------------------------------------------------------------------------------
# Gradients
#
# With g = weight * dy, xhat = (x - mean) * rstd and M elements per group:
#   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight = sum(dy * xhat),  dbias = sum(dy)
# (without centering, as in RMS norm, the mean(g) term is absent).  Written as
#   dx = (rstd * weight) * dy + coef_x * (x - mean) + coef_0.
# ---------------------------------------------------------------------------------------------------------

cdef inline void gradient_sums(const floating* dy, const floating* x,   # IN (m,)
                               const floating* weight,                 # IN (m,) or NULL for all ones
                               Py_ssize_t m, floating mean_hi, floating mean_lo, floating rs,
                               double* sum_g, double* sum_g_xhat) noexcept nogil:
    """OUT sum(g), sum(g * xhat) with g = weight * dy over m consecutive elements: float lanes within
    CHUNK-sized blocks, blocks added in double."""
    cdef floating s1[LANES]
    cdef floating s2[LANES]
    cdef floating q1[TAIL_LANES]
    cdef floating q2[TAIL_LANES]
    cdef floating xhat, g, tail1, tail2, rest1, rest2
    cdef Py_ssize_t start, i, end, body, tail_body, step, block
    cdef int j
    sum_g[0] = 0
    sum_g_xhat[0] = 0
    for step in range((m + CHUNK - 1) // CHUNK):
        start = step * CHUNK
        end = min(start + CHUNK, m)
        body = end - (end - start) % LANES
        tail_body = end - (end - start) % TAIL_LANES
        rest1 = 0
        rest2 = 0
        for j in range(TAIL_LANES):
            q1[j] = 0
            q2[j] = 0
        for block in range((tail_body - body) // TAIL_LANES):
            i = body + block * TAIL_LANES
            for j in range(TAIL_LANES):
                xhat = ((x[i + j] - mean_hi) - mean_lo) * rs
                g = dy[i + j] if weight == NULL else weight[i + j] * dy[i + j]
                q1[j] += g
                q2[j] += g * xhat
        for i in range(tail_body, end):
            xhat = ((x[i] - mean_hi) - mean_lo) * rs
            g = dy[i] if weight == NULL else weight[i] * dy[i]
            rest1 += g
            rest2 += g * xhat
        tail1 = tail_lanes_total(q1, rest1)
        tail2 = tail_lanes_total(q2, rest2)
        if body == start:   # a short row (see centred_sums)
            sum_g[0] += tail1
            sum_g_xhat[0] += tail2
            continue
        # the first block sets the lanes (see centred_sums)
        for j in range(LANES):
            xhat = ((x[start + j] - mean_hi) - mean_lo) * rs
            g = dy[start + j] if weight == NULL else weight[start + j] * dy[start + j]
            s1[j] = g
            s2[j] = g * xhat
        if weight == NULL:
            for block in range(1, (body - start) // LANES):
                i = start + block * LANES
                for j in range(LANES):
                    xhat = ((x[i + j] - mean_hi) - mean_lo) * rs
                    s1[j] += dy[i + j]
                    s2[j] += dy[i + j] * xhat
        else:
            for block in range(1, (body - start) // LANES):
                i = start + block * LANES
                for j in range(LANES):
                    xhat = ((x[i + j] - mean_hi) - mean_lo) * rs
                    g = weight[i + j] * dy[i + j]
                    s1[j] += g
                    s2[j] += g * xhat
        sum_g[0] += vector_lanes_total(s1, tail1)
        sum_g_xhat[0] += vector_lanes_total(s2, tail2)


cdef inline void input_gradient_values(const floating* dy, const floating* x,   # IN: n consecutive values of a row
                                       floating* dx,                             # OUT (n,)
                                       Py_ssize_t n, Py_ssize_t first,  # dy[0] is element `first` of the row
                                       Py_ssize_t inner,
                                       const floating* weight,           # the row's channels
                                       double rstd, floating mean_hi, floating coef_x,
                                       floating coef_0) noexcept nogil:
    """dx = rstd * weight[c] * dy + coef_x * (x - mean_hi) + coef_0, where channel c holds `inner` consecutive
    elements."""
    cdef floating rs = <floating>rstd
    cdef floating scale
    cdef Py_ssize_t i, c, start, stop, body
    if inner == 1:
        for i in range(n):
            dx[i] = rs * weight[first + i] * dy[i] + coef_x * (x[i] - mean_hi) + coef_0
        return
    if (floating is float and CYNORM_HAVE_CHANNEL_QUADS and inner < CHANNEL_QUAD_INNER and first % inner == 0
            and n % inner == 0):
        cynorm_channels_input_gradient_float(dy, x, dx, inner, n // inner, weight + first // inner, rstd, mean_hi,
                                             coef_x, coef_0)
        return
    for c in range(first // inner, (first + n + inner - 1) // inner):
        scale = <floating>(rstd * weight[c])
        start = max(first, c * inner) - first
        stop = min(first + n, (c + 1) * inner) - first
        body = min(start + values_before_vector(dx + start), stop)   # (as normalize_values splits its loop)
        for i in range(start, body):
            dx[i] = scale * dy[i] + coef_x * (x[i] - mean_hi) + coef_0
        for i in range(body, stop):
            dx[i] = scale * dy[i] + coef_x * (x[i] - mean_hi) + coef_0


cdef inline void split_row_statistics(const double* mean, const double* rstd,   # IN  rows k at k * stride
                                      Py_ssize_t stride, Py_ssize_t count, int lanes,
                                      floating* mean_hi, floating* mean_lo,
                                      floating* rs) noexcept nogil:   # OUT (lanes,) each
    """The float parts of `count` rows' statistics that the gradients use: each mean as a high and a low part
    (the low part goes into a constant, as in normalize_values), and rstd; lanes past `count` repeat the first
    row.  `mean` is NULL when the rows are not centered."""
    cdef double row_mean
    cdef int k
    for k in range(lanes):
        row_mean = mean[(k if k < count else 0) * stride] if mean != NULL else 0
        mean_hi[k] = <floating>row_mean
        mean_lo[k] = <floating>mean_beyond(row_mean, mean_hi[k])
        rs[k] = <floating>rstd[(k if k < count else 0) * stride]


cdef inline void add_parameter_terms(const floating* dy, const floating* x,   # IN  rows k at k * row_stride
                                     Py_ssize_t row_stride, Py_ssize_t count, Py_ssize_t length,
                                     const double* mean, const double* rstd,   # IN  rows k at k * stat_stride
                                     Py_ssize_t stat_stride,
                                     floating* dweight_run, floating* dbias_run) noexcept nogil:  # INOUT (length,)
    """The terms of dweight and dbias of `count` <= TERM_ROWS rows, one element per channel (inner == 1), added
    row after row into each element's sums (four rows in one pass where the build allows, see
    tile_moments_around).  `mean` is NULL when the rows are not centered."""
    cdef floating mean_hi[TERM_ROWS]
    cdef floating mean_lo[TERM_ROWS]
    cdef floating rs[TERM_ROWS]
    cdef const floating* d0
    cdef const floating* d1
    cdef const floating* d2
    cdef const floating* d3
    cdef const floating* x0
    cdef const floating* x1
    cdef const floating* x2
    cdef const floating* x3
    cdef floating xhat
    cdef Py_ssize_t i
    cdef int k
    split_row_statistics(mean, rstd, stat_stride, count, count, mean_hi, mean_lo, rs)
    if count == 4 and CYNORM_WIDE_ALIAS_CHECKS:
        d0 = dy
        d1 = dy + row_stride
        d2 = dy + 2 * row_stride
        d3 = dy + 3 * row_stride
        x0 = x
        x1 = x + row_stride
        x2 = x + 2 * row_stride
        x3 = x + 3 * row_stride
        for i in range(length):
            dweight_run[i] = ((((dweight_run[i] + d0[i] * (((x0[i] - mean_hi[0]) - mean_lo[0]) * rs[0]))
                                + d1[i] * (((x1[i] - mean_hi[1]) - mean_lo[1]) * rs[1]))
                               + d2[i] * (((x2[i] - mean_hi[2]) - mean_lo[2]) * rs[2]))
                              + d3[i] * (((x3[i] - mean_hi[3]) - mean_lo[3]) * rs[3]))
            dbias_run[i] = (((dbias_run[i] + d0[i]) + d1[i]) + d2[i]) + d3[i]
        return
    for k in range(count):
        add_row_range_terms(dy + k * row_stride, x + k * row_stride, length, mean_hi[k], mean_lo[k], rs[k],
                            dweight_run, dbias_run)


cdef inline void add_row_range_terms(const floating* dy, const floating* x, Py_ssize_t n,   # IN (n,) of one row
                                     floating mean_hi, floating mean_lo, floating rs,   # the row's, split
                                     floating* dweight_run, floating* dbias_run) noexcept nogil:  # INOUT (n,)
    """One row's terms of dweight and dbias added into the running sums of its n elements."""
    cdef Py_ssize_t i
    for i in range(n):
        dweight_run[i] += dy[i] * (((x[i] - mean_hi) - mean_lo) * rs)
        dbias_run[i] += dy[i]


cdef inline void flush_parameter_terms(floating* dweight_run, floating* dbias_run,   # INOUT, cleared
                                       double* dweight_partial, double* dbias_partial,   # INOUT
                                       Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(length):
        dweight_partial[c] += dweight_run[c]
        dbias_partial[c] += dbias_run[c]
        dweight_run[c] = 0
        dbias_run[c] = 0


cdef inline void input_gradient_coefficients(double sum_g, double sum_g_xhat, Py_ssize_t length, double mean,
                                             double rstd, bint centered,
                                             floating* coefs) noexcept nogil:  # OUT coef_x, coef_0
    """A row's coefficients of dx = rstd * weight * dy + coef_x * (x - mean_hi) + coef_0 from its gradient sums;
    the low part of the mean goes into the constant."""
    cdef floating mean_lo = <floating>mean_beyond(mean, <floating>mean)
    cdef double k1 = sum_g / length if centered else 0.0
    cdef double k2 = sum_g_xhat / length
    coefs[0] = <floating>(-rstd * rstd * k2)
    coefs[1] = <floating>(-rstd * k1 + rstd * rstd * k2 * mean_lo)


cdef inline void add_row_terms(const floating* dy, const floating* x,   # IN  the block's rows, k at k * row_stride
                               Py_ssize_t row_stride, Py_ssize_t k, Py_ssize_t count, Py_ssize_t length,
                               const double* mean, const double* rstd,   # IN  rows k at k * stat_stride
                               Py_ssize_t stat_stride,
                               floating* dweight_run, floating* dbias_run,        # INOUT (length,)
                               double* dweight_partial, double* dbias_partial) noexcept nogil:  # INOUT
    """Called after row k of a block of `count` rows (one element per channel) has its dx: adds the parameter
    terms of the rows since the last multiple of TERM_ROWS into the float running sums when a multiple ends or the
    block does, and flushes them into the block's partials after every ROWS_PER_FLUSH rows and the last.  `mean`
    is NULL when the rows are not centered."""
    cdef Py_ssize_t k0 = k - k % TERM_ROWS
    if (k + 1) % TERM_ROWS != 0 and k != count - 1:
        return
    add_parameter_terms(dy + k0 * row_stride, x + k0 * row_stride, row_stride, k - k0 + 1, length,
                        mean + k0 * stat_stride if mean != NULL else NULL, rstd + k0 * stat_stride, stat_stride,
                        dweight_run, dbias_run)
    if (k + 1) % ROWS_PER_FLUSH == 0 or k == count - 1:
        flush_parameter_terms(dweight_run, dbias_run, dweight_partial, dbias_partial, length)


cdef inline void backward_row(const floating* dy, const floating* x, floating* dx,  # one row
                              Py_ssize_t length, Py_ssize_t inner,
                              const floating* weight,          # IN  the row's channels
                              double mean, double rstd, bint centered,
                              double* dweight_acc, double* dbias_acc,         # INOUT the row's channels (inner > 1)
                              bint stream,
                              const floating* next_dy, const floating* next_x,  # IN or NULL
                              double* sums,  # OUT (2,) when dx is NULL
                              floating* terms_weight, floating* terms_bias,  # INOUT (length,) or NULL
                              cynorm_stream_writer* writer) noexcept nogil:  # the thread's, if `stream`
    """One row's dx, and with several elements per channel its terms of dweight and dbias (with one, the
    caller adds them with add_parameter_terms); dx is written with streaming stores through `writer` if
    `stream` (the caller flushes it and fences them, see normalize_row_range).  `next_dy` and `next_x`, a row
    the thread takes later, are prefetched block by block while dx is written, as normalize_row_range does.

    With dx NULL, only the row's sum(g) and sum(g * xhat), into `sums` (long_rows_backward's pieces), so that
    gradient_sums keeps one caller, which GCC inlines (a second made it a call, and rows of 32 values 1.2x
    slower; see -fno-ipa-cp-clone in setup.py)."""
    cdef floating buffer[STREAM_BLOCK]
    cdef floating staging[ROW_STAGE + STAGING_SLACK]
    cdef floating* stage
    cdef Py_ssize_t block, end
    cdef floating mean_hi = <floating>mean
    cdef floating mean_lo = <floating>mean_beyond(mean, mean_hi)
    cdef floating rs = <floating>rstd
    cdef floating coef_x, coef_0
    cdef double sum_g = 0, sum_g_xhat = 0, sum_dy, sum_dy_xhat
    cdef floating coefs[2]
    cdef Py_ssize_t c, channels = length // inner
    if inner == 1:
        # one element per channel: the row sums weighted
        gradient_sums(dy, x, weight, length, mean_hi, mean_lo, rs, &sum_g, &sum_g_xhat)
    else:
        c = 0
        if floating is float and CYNORM_HAVE_CHANNEL_QUADS and channels >= 4 and inner < CHANNEL_QUAD_INNER:
            c = cynorm_channel_quads_gradient_sums_float(dy, x, inner, channels, weight, mean_hi, mean_lo, rs,
                                                         dweight_acc, dbias_acc, &sum_g, &sum_g_xhat)
        for c in range(c, channels):
            gradient_sums(dy + c * inner, x + c * inner, NULL, inner, mean_hi, mean_lo, rs,
                          &sum_dy, &sum_dy_xhat)
            dweight_acc[c] += sum_dy_xhat
            dbias_acc[c] += sum_dy
            sum_g += weight[c] * sum_dy
            sum_g_xhat += weight[c] * sum_dy_xhat
    if dx == NULL:
        sums[0] = sum_g
        sums[1] = sum_g_xhat
        return
    input_gradient_coefficients(sum_g, sum_g_xhat, length, mean, rstd, centered, coefs)
    coef_x = coefs[0]
    coef_0 = coefs[1]
    # (a float row of whole vectors in one loop: see cynorm_row_input_gradient_float)
    if (floating is float and CYNORM_HAVE_ROW_LOOP and inner == 1 and terms_weight != NULL and length % 16 == 0
            and (<size_t>dx) % sizeof(float) == 0):
        if not stream or CYNORM_ROW_LOOP_JOINS_LINES or (<size_t>dx) % CYNORM_LINE_BYTES == 0:
            cynorm_row_input_gradient_float(dy, x, dx, length, weight, rs, mean_hi, mean_lo, coef_x, coef_0,
                                            terms_weight, terms_bias, stream, writer, next_dy, next_x)
            return
        # dx streams from registers only where it starts a line (AVX-512 builds join lines): elsewhere, such
        # as into NumPy's outputs, 16 bytes past a line, the loop fills an aligned buffer, a stage at a time,
        # and the writer streams it, rather than the two loops below (layer norm backward, x, dy and dx all 16
        # bytes past a line, on a Zen 3: (4096,768) 1.25-1.28x, (8192,768) 1.24-1.38x, (8,512,1024) 1.26-1.31x,
        # (16384,256) 1.11x; the same bits)
        stage = staging + cynorm_values_to_vector(staging, sizeof(floating))
        c = 0
        while c < length:   # (a row's values a stage at a time)
            end = min(c + ROW_STAGE, length)
            cynorm_row_input_gradient_float(dy + c, x + c, <float*>stage, end - c, weight + c, rs, mean_hi, mean_lo,
                                            coef_x, coef_0, terms_weight + c, terms_bias + c, False, writer,
                                            next_dy + c if next_dy != NULL else NULL,
                                            next_x + c if next_x != NULL else NULL)
            stream_put(writer, dx + c, stage, end - c)
            c = end
        return
    if not stream and next_x == NULL:
        input_gradient_values(dy, x, dx, length, 0, inner, weight, rstd, mean_hi, coef_x, coef_0)
        if terms_weight != NULL:
            add_row_range_terms(dy, x, length, mean_hi, mean_lo, rs, terms_weight, terms_bias)
        return
    if floating is float and CYNORM_HAVE_CHANNEL_QUADS and inner > 1 and inner < CHANNEL_QUAD_INNER:
        # whole channels at a time, as many as the buffer holds, in the channels' vectors (see
        # cynorm_channels_input_gradient_float): blocks of 256 values cut channels into pieces that the loops
        # below took one by one, and (64,512,7,7) ran 1.11x slower
        c = 0
        while c < channels:
            end = min(c + max(1, STREAM_BLOCK // inner), channels)   # (channels [c, end) this time)
            if next_x != NULL:
                cynorm_prefetch_lines(next_dy + c * inner, (end - c) * inner * sizeof(floating))
                cynorm_prefetch_lines(next_x + c * inner, (end - c) * inner * sizeof(floating))
            cynorm_channels_input_gradient_float(dy + c * inner, x + c * inner,
                                                 &buffer[0] if stream else dx + c * inner, inner, end - c,
                                                 weight + c, rstd, mean_hi, coef_x, coef_0)
            if stream:
                stream_put(writer, dx + c * inner, buffer, (end - c) * inner)
            c = end
        return
    block = 0
    while block < length:
        end = streamed_block_end(dx, block, length) if stream else min(block + STREAM_BLOCK, length)
        if next_x != NULL:
            cynorm_prefetch_lines(next_dy + block, (end - block) * sizeof(floating))
            cynorm_prefetch_lines(next_x + block, (end - block) * sizeof(floating))
        input_gradient_values(dy + block, x + block, &buffer[0] if stream else dx + block, end - block, block, inner,
                              weight, rstd, mean_hi, coef_x, coef_0)
        if terms_weight != NULL:   # (while the block is in L1)
            add_row_range_terms(dy + block, x + block, end - block, mean_hi, mean_lo, rs, terms_weight + block,
                                terms_bias + block)
        if stream:
            stream_put(writer, dx + block, buffer, end - block)
        block = end


cdef inline void short_rows_backward(const floating* dy, const floating* x,   # IN  rows k at k * row_stride
                                     floating* dx,                           # OUT the same
                                     Py_ssize_t row_stride, Py_ssize_t count, Py_ssize_t length,
                                     const floating* weight,   # IN  (length,) the rows' channels, one value each
                                     const double* mean, const double* rstd,   # IN  rows k at k * stat_stride
                                     Py_ssize_t stat_stride, bint centered,
                                     floating* dweight_run, floating* dbias_run,        # INOUT (length,)
                                     double* dweight_partial, double* dbias_partial,    # INOUT (length,)
                                     bint stream, cynorm_stream_writer* writer) noexcept nogil:
    """backward_row for `count` <= ROW_BLOCK rows of at most SHORT_BACKWARD_ROW values, one element per channel:
    the rows' gradient sums and dx computed together, a row per vector lane (as block_moments), dx streamed in
    one piece when the rows are consecutive.  The parameter terms are added row after row and flushed after
    every ROWS_PER_FLUSH rows of the block and after its last (a block ends with its task, or a multiple of
    ROW_BLOCK rows into it), as rows_backward does row by row."""
    cdef floating lanes_dy[ROW_BLOCK * SHORT_BACKWARD_ROW]
    cdef floating lanes_x[ROW_BLOCK * SHORT_BACKWARD_ROW]
    cdef floating lanes_g[ROW_BLOCK * SHORT_BACKWARD_ROW]      # g = weight * dy, then dx
    cdef floating lanes_xhat[ROW_BLOCK * SHORT_BACKWARD_ROW]   # xhat, then dx streamed in row order
    cdef floating mean_hi[ROW_BLOCK]
    cdef floating mean_lo[ROW_BLOCK]
    cdef floating rs[ROW_BLOCK]
    cdef floating coef_x[ROW_BLOCK]
    cdef floating coef_0[ROW_BLOCK]
    cdef floating zeros[ROW_BLOCK]
    cdef floating s1[ROW_BLOCK]
    cdef floating s2[ROW_BLOCK]
    cdef double row_rstd, k1, k2
    cdef floating* out
    cdef Py_ssize_t j, out_stride
    cdef bint streamed
    cdef int k, quad
    split_row_statistics(mean, rstd, stat_stride, count, ROW_BLOCK, mean_hi, mean_lo, rs)
    streamed = stream and row_stride == length
    out = &lanes_xhat[0] if streamed else dx
    out_stride = length if streamed else row_stride
    if floating is float and CYNORM_HAVE_ROW_QUADS and count == ROW_BLOCK and length == ROW_BLOCK:
        cynorm_rows16_backward_float(dy, x, out, row_stride, out_stride, weight, mean_hi, mean_lo, rs, rstd,
                                     stat_stride, centered, dweight_run, dbias_run, dweight_partial, dbias_partial)
        if streamed:
            stream_put(writer, dx, out, count * length)
        return
    for k in range(ROW_BLOCK):
        zeros[k] = 0
    gather_rows(dy, row_stride, count, length, lanes_dy)
    gather_rows(x, row_stride, count, length, lanes_x)
    for j in range(length):
        for k in range(ROW_BLOCK):
            lanes_g[j * ROW_BLOCK + k] = weight[j] * lanes_dy[j * ROW_BLOCK + k]
            lanes_xhat[j * ROW_BLOCK + k] = ((lanes_x[j * ROW_BLOCK + k] - mean_hi[k]) - mean_lo[k]) * rs[k]
    lane_sums(lanes_g, lanes_xhat, length, zeros, s1, s2)
    # as backward_row: dx = rstd * weight * dy + coef_x * (x - mean_hi) + coef_0
    for k in range(ROW_BLOCK):
        row_rstd = rstd[(k if k < count else 0) * stat_stride]
        k1 = s1[k] / <double>length if centered else 0.0
        k2 = s2[k] / <double>length
        coef_x[k] = <floating>(-row_rstd * row_rstd * k2)
        coef_0[k] = <floating>(-row_rstd * k1 + row_rstd * row_rstd * k2 * mean_lo[k])
    for j in range(length):
        for k in range(ROW_BLOCK):
            lanes_g[j * ROW_BLOCK + k] = (rs[k] * weight[j] * lanes_dy[j * ROW_BLOCK + k]
                                          + coef_x[k] * (lanes_x[j * ROW_BLOCK + k] - mean_hi[k]) + coef_0[k])
    for quad in range((count + TERM_ROWS - 1) // TERM_ROWS):
        k = quad * TERM_ROWS
        add_parameter_terms(dy + k * row_stride, x + k * row_stride, row_stride, min(<Py_ssize_t>TERM_ROWS, count - k),
                            length, mean + k * stat_stride if mean != NULL else NULL, rstd + k * stat_stride,
                            stat_stride, dweight_run, dbias_run)
        if (k + TERM_ROWS) % ROWS_PER_FLUSH == 0 or k + TERM_ROWS >= count:
            flush_parameter_terms(dweight_run, dbias_run, dweight_partial, dbias_partial, length)
    # consecutive rows streamed: assembled in row order (the xhat lanes are free again), stored in one piece
    if count == ROW_BLOCK:   # (element j of every row at once, as gather_rows: backward on rows of 4-20 1.1-1.3x)
        for j in range(length):
            for k in range(ROW_BLOCK):
                out[k * out_stride + j] = lanes_g[j * ROW_BLOCK + k]
    else:
        for k in range(count):
            for j in range(length):
                out[k * out_stride + j] = lanes_g[j * ROW_BLOCK + k]
    if streamed:
        stream_put(writer, dx, out, count * length)


cdef inline void input_gradient_range(const floating* dy, const floating* x, floating* dx,   # one row
                                      Py_ssize_t start, Py_ssize_t stop,   # the elements written
                                      Py_ssize_t inner,                    # elements per channel
                                      const floating* weight,              # IN  the row's channels
                                      double rstd, floating mean_hi, floating coef_x, floating coef_0,
                                      bint stream) noexcept nogil:
    """dx of elements [start, stop) of a row, with streaming stores if `stream` (the caller fences them)."""
    cdef floating buffer[STREAM_BLOCK]
    cdef Py_ssize_t block = start, end
    if not stream:
        input_gradient_values(dy + start, x + start, dx + start, stop - start, start, inner, weight, rstd, mean_hi,
                              coef_x, coef_0)
        return
    while block < stop:
        end = streamed_block_end(dx, block, stop)
        input_gradient_values(dy + block, x + block, buffer, end - block, block, inner, weight, rstd, mean_hi,
                              coef_x, coef_0)
        stream_copy(dx + block, buffer, end - block)
        block = end


cdef void long_rows_backward(const floating* dy, const floating* x, const double* mean, const double* rstd,
                             const floating* weight, floating* dx, floating* dweight, floating* dbias,
                             Py_ssize_t n_rows, Py_ssize_t groups, Py_ssize_t length, bint centered, bint stream,
                             int num_threads):
    """rows_backward for long rows of one element per channel (LONG_ROW).  The rows are cut into CHUNK-sized
    pieces whose gradient sums are taken in parallel and added in order (as gradient_sums adds them); then each
    task takes CHANNEL_SLAB channels: their dx in every row, and their parameter terms added row after row, as
    rows_backward adds them in one block.  A row at a time, a thread did a whole row, so one to three rows left
    threads idle, and each block of one or two rows had partials as large as its rows.  The same bits whatever
    the number of threads: the pieces and the slabs depend on the shape only."""
    cdef Py_ssize_t chunks = (length + CHUNK - 1) // CHUNK
    cdef Py_ssize_t n_samples = n_rows // groups
    cdef Py_ssize_t u, r, g, n, k, start, m, c
    cdef double sum_g, sum_g_xhat
    cdef Py_ssize_t slabs = (length + CHANNEL_SLAB - 1) // CHANNEL_SLAB
    cdef Scratch memory
    cdef double* sums
    cdef floating* coefs
    cdef floating* running    # a thread's at threadid() * 2 * CHANNEL_SLAB (whole lines)
    cdef double* partial      # the same
    cdef floating* weight_run
    cdef floating* bias_run
    cdef double* weight_partial
    cdef double* bias_partial
    open_scratch(&memory, whole_lines(2 * n_rows * chunks * sizeof(double)) + whole_lines(2 * n_rows * sizeof(floating))
                 + num_threads * 2 * CHANNEL_SLAB * (sizeof(floating) + sizeof(double)))
    sums = <double*>scratch_piece(&memory, 2 * n_rows * chunks * sizeof(double), False)
    coefs = <floating*>scratch_piece(&memory, 2 * n_rows * sizeof(floating), False)
    running = <floating*>scratch_piece(&memory, num_threads * 2 * CHANNEL_SLAB * sizeof(floating), True)
    partial = <double*>scratch_piece(&memory, num_threads * 2 * CHANNEL_SLAB * sizeof(double), True)
    with nogil, parallel(num_threads=num_threads):
        for u in prange(n_rows * chunks, schedule="static"):
            r = u // chunks
            start = (u % chunks) * CHUNK
            backward_row(&dy[r * length + start], &x[r * length + start], NULL, min(<Py_ssize_t>CHUNK, length - start),
                         1, &weight[(r % groups) * length + start], mean[r] if mean != NULL else 0, rstd[r], centered,
                         NULL, NULL, False, NULL, NULL, &sums[2 * u], NULL, NULL, NULL)
    with nogil:
        # each row's coefficients, as backward_row computes them
        for r in range(n_rows):
            sum_g = 0
            sum_g_xhat = 0
            for k in range(chunks):
                sum_g += sums[2 * (r * chunks + k)]
                sum_g_xhat += sums[2 * (r * chunks + k) + 1]
            input_gradient_coefficients(sum_g, sum_g_xhat, length, mean[r] if mean != NULL else 0, rstd[r],
                                        centered, &coefs[2 * r])
    with nogil, parallel(num_threads=num_threads):
        weight_run = &running[threadid() * 2 * CHANNEL_SLAB]
        bias_run = weight_run + CHANNEL_SLAB
        weight_partial = &partial[threadid() * 2 * CHANNEL_SLAB]
        bias_partial = weight_partial + CHANNEL_SLAB
        for u in prange(groups * slabs, schedule="static"):
            g = u // slabs
            start = (u % slabs) * CHANNEL_SLAB
            m = min(<Py_ssize_t>CHANNEL_SLAB, length - start)
            memset(weight_partial, 0, 2 * CHANNEL_SLAB * sizeof(double))
            for n in range(n_samples):
                r = n * groups + g
                input_gradient_range(&dy[r * length], &x[r * length], &dx[r * length], start, start + m, 1,
                                     &weight[g * length], rstd[r], <floating>(mean[r] if mean != NULL else 0),
                                     coefs[2 * r], coefs[2 * r + 1], stream)
                add_row_terms(&dy[g * length + start], &x[g * length + start], groups * length, n, n_samples, m,
                              &mean[g] if mean != NULL else NULL, &rstd[g], groups, weight_run, bias_run,
                              weight_partial, bias_partial)
            for c in range(m):
                dweight[g * length + start + c] = <floating>weight_partial[c]
                dbias[g * length + start + c] = <floating>bias_partial[c]
        if stream:
            cynorm_store_fence()
    free(memory.memory)


cdef void few_rows_backward(const floating* dy, const floating* x, const double* mean, const double* rstd,
                            const floating* weight, floating* dx, floating* dweight, floating* dbias,
                            Py_ssize_t n_rows, Py_ssize_t groups, Py_ssize_t chans_per_group, Py_ssize_t inner,
                            bint centered, bint stream, int num_threads):
    """rows_backward for fewer than TILE_MULTIPLE long rows of several elements per channel (GroupNorm of one
    sample with few groups, InstanceNorm of one RGB image), shared between threads by CHUNK-sized pieces of
    each channel where a thread took a whole row: every piece's sums, then each channel's (the pieces added in
    order, as gradient_sums adds its chunks) and each row's coefficients, then every piece's dx.  The same bits
    as rows_backward, which gives each of so few rows a block of its own."""
    cdef Py_ssize_t length = chans_per_group * inner, n_samples = n_rows // groups
    # channels cut into CHUNK-sized pieces only when there are too few to share (more pieces cost 3-5 %)
    cdef Py_ssize_t piece = CHUNK if n_rows * chans_per_group < 16 else inner
    cdef Py_ssize_t pieces = (inner + piece - 1) // piece
    cdef Py_ssize_t u, r, c, k, n, g, start, m
    cdef double sum_g, sum_g_xhat, weight_total, bias_total, unused[2]
    cdef Py_ssize_t piece_sums_bytes = 2 * n_rows * chans_per_group * pieces * sizeof(double)
    cdef Py_ssize_t channel_sums_bytes = 2 * n_rows * chans_per_group * sizeof(double)
    cdef Scratch memory
    cdef double* piece_sums
    cdef double* channel_sums
    cdef floating* coefs
    open_scratch(&memory, whole_lines(piece_sums_bytes) + whole_lines(channel_sums_bytes)
                 + whole_lines(2 * n_rows * sizeof(floating)))
    piece_sums = <double*>scratch_piece(&memory, piece_sums_bytes, True)   # [row][channel][piece][2]
    channel_sums = <double*>scratch_piece(&memory, channel_sums_bytes, True)   # [row][channel][sum(dy) | dy * xhat]
    coefs = <floating*>scratch_piece(&memory, 2 * n_rows * sizeof(floating), False)
    with nogil, parallel(num_threads=num_threads):
        for u in prange(n_rows * chans_per_group * pieces, schedule="static"):
            r = u // (chans_per_group * pieces)
            c = (u // pieces) % chans_per_group
            start = c * inner + (u % pieces) * piece
            m = min(piece, (c + 1) * inner - start)
            # (backward_row's sums of a row of one channel, which gradient_sums keeps one caller)
            backward_row(&dy[r * length + start], &x[r * length + start], NULL, m, m,
                         &weight[(r % groups) * chans_per_group + c], mean[r] if mean != NULL else 0, rstd[r],
                         centered, &piece_sums[2 * u + 1], &piece_sums[2 * u], False, NULL, NULL, unused, NULL,
                         NULL, NULL)
    with nogil:
        # each row's weighted sums in channel order, and its coefficients, as backward_row adds and computes them
        for r in range(n_rows):
            sum_g = 0
            sum_g_xhat = 0
            for c in range(chans_per_group):
                u = r * chans_per_group + c
                for k in range(pieces):
                    channel_sums[2 * u] += piece_sums[2 * (u * pieces + k)]
                    channel_sums[2 * u + 1] += piece_sums[2 * (u * pieces + k) + 1]
                sum_g += weight[(r % groups) * chans_per_group + c] * channel_sums[2 * u]
                sum_g_xhat += weight[(r % groups) * chans_per_group + c] * channel_sums[2 * u + 1]
            input_gradient_coefficients(sum_g, sum_g_xhat, length, mean[r] if mean != NULL else 0, rstd[r],
                                        centered, &coefs[2 * r])
        # each channel's samples in order, as rows_backward adds its blocks of one row
        for u in range(groups * chans_per_group):
            g = u // chans_per_group
            weight_total = 0
            bias_total = 0
            for n in range(n_samples):
                weight_total += channel_sums[2 * ((n * groups + g) * chans_per_group + u % chans_per_group) + 1]
                bias_total += channel_sums[2 * ((n * groups + g) * chans_per_group + u % chans_per_group)]
            dweight[u] = <floating>weight_total
            dbias[u] = <floating>bias_total
    with nogil, parallel(num_threads=num_threads):
        for u in prange(n_rows * chans_per_group * pieces, schedule="static"):
            r = u // (chans_per_group * pieces)
            c = (u // pieces) % chans_per_group
            start = c * inner + (u % pieces) * piece
            input_gradient_range(&dy[r * length], &x[r * length], &dx[r * length], start,
                                 min(start + piece, (c + 1) * inner), inner, &weight[(r % groups) * chans_per_group],
                                 rstd[r], <floating>(mean[r] if mean != NULL else 0), coefs[2 * r], coefs[2 * r + 1],
                                 stream)
        if stream:
            cynorm_store_fence()
    free(memory.memory)


def backward_rows(size_t dy,        # IN  (n_rows * length,)
                  size_t x,         # IN  (n_rows * length,)
                  size_t mean,      # IN  (n_rows,) float64, or 0 for zeros (not centered)
                  size_t rstd,      # IN  (n_rows,) float64
                  size_t weight,    # IN  (groups * chans_per_group,)
                  size_t dx,        # OUT (n_rows * length,)
                  size_t dweight,   # OUT (groups * chans_per_group,)
                  size_t dbias,     # OUT (groups * chans_per_group,)
                  bint float64, Py_ssize_t n_rows, Py_ssize_t groups, Py_ssize_t chans_per_group,
                  Py_ssize_t inner, bint centered, bint stream, bint prefetch, int num_threads):
    """Rows view backward.  Rows of a block of samples add into that block's own dweight/dbias partials
    (one task per (block, group): no shared writes); the blocks are then summed in order, in float64.
    `stream` and `prefetch` as for forward_rows."""
    if float64:
        rows_backward(<const double*>dy, <const double*>x, <const double*>mean, <const double*>rstd,
                      <const double*>weight, <double*>dx, <double*>dweight, <double*>dbias, n_rows, groups,
                      chans_per_group, inner, centered, stream, prefetch, num_threads)
    else:
        rows_backward(<const float*>dy, <const float*>x, <const double*>mean, <const double*>rstd,
                      <const float*>weight, <float*>dx, <float*>dweight, <float*>dbias, n_rows, groups,
                      chans_per_group, inner, centered, stream, prefetch, num_threads)


cdef inline void rows4_backward(const floating* dy, const floating* x, floating* dx, Py_ssize_t row_stride,
                               Py_ssize_t length, const floating* weight, const double* mean, const double* rstd,
                               Py_ssize_t stat_stride, bint centered, floating* dweight_run,
                               floating* dbias_run, bint stream,
                               cynorm_stream_writer* writer) noexcept nogil:   # the thread's, if `stream`
    """Four rows' dx and parameter terms (float only: rows_backward takes double rows one at a time).  With
    `stream`, dx goes out with streaming stores: straight where its vectors are whole lines, else (four
    consecutive rows of at most QUAD_STREAMED_ROW values, AVX-512 builds) through a buffer and `writer`."""
    cdef floating buffer[4 * QUAD_STREAMED_ROW]
    if floating is float:
        if stream and (<size_t>dx) % CYNORM_LINE_BYTES != 0:   # (AVX-512 builds' rows of QUAD_STREAMED_ROW or less)
            cynorm_rows4_backward_float(dy, x, buffer, row_stride, length, weight, mean, rstd, stat_stride,
                                        centered, dweight_run, dbias_run, False)
            stream_put(writer, dx, buffer, 4 * length)
            return
        if stream:   # (nothing is pending where dx and every row start lines, but the order must hold)
            stream_flush(writer, dx)
        if length > QUAD_STREAMED_ROW or not CYNORM_HAVE_ROW_QUADS:
            cynorm_rows4_row_loops_backward_float(dy, x, dx, row_stride, length, weight, mean, rstd, stat_stride,
                                                  centered, dweight_run, dbias_run, stream)
        else:
            cynorm_rows4_backward_float(dy, x, dx, row_stride, length, weight, mean, rstd, stat_stride, centered,
                                        dweight_run, dbias_run, stream)


cdef inline void channel_rows4_backward(const floating* dy, const floating* x,   # IN  rows k at k * row_stride
                                       floating* dx,                           # OUT the same
                                       Py_ssize_t row_stride, Py_ssize_t inner,
                                       const floating* weight,   # IN  the channel's
                                       const double* mean, const double* rstd,   # IN  rows k at k * stat_stride
                                       Py_ssize_t stat_stride, bint centered,
                                       double* dweight_acc, double* dbias_acc) noexcept nogil:  # INOUT the channel's
    """backward_row for four rows of a single channel, their gradient sums taken together (float only:
    rows_backward takes double rows one at a time)."""
    cdef double sum_dy[4]
    cdef double sum_dy_xhat[4]
    cdef floating coefs[2]
    cdef double row_mean
    cdef int k
    if floating is float:
        cynorm_channel_rows4_gradient_sums_float(dy, x, row_stride, inner, mean, rstd, stat_stride, sum_dy,
                                                 sum_dy_xhat)
    for k in range(4):
        dweight_acc[0] += sum_dy_xhat[k]
        dbias_acc[0] += sum_dy[k]
        row_mean = mean[k * stat_stride] if mean != NULL else 0
        # (the sums over one channel, as backward_row adds them up from 0)
        input_gradient_coefficients(0.0 + weight[0] * sum_dy[k], 0.0 + weight[0] * sum_dy_xhat[k], inner, row_mean,
                                    rstd[k * stat_stride], centered, coefs)
        input_gradient_values(dy + k * row_stride, x + k * row_stride, dx + k * row_stride, inner, 0, inner, weight,
                              rstd[k * stat_stride], <floating>row_mean, coefs[0], coefs[1])


cdef inline void add_block_partials(const double* partials,   # IN (blocks, 2 * channels): dweight's, dbias's
                                    Py_ssize_t blocks, Py_ssize_t channels, Py_ssize_t start, Py_ssize_t stop,
                                    floating* dweight, floating* dbias) noexcept nogil:   # OUT (channels,) each
    """Columns [start, stop) of the partials' sums over the blocks, in block order, every column at once (a
    column at a time, the strided sums took 5 % of a layer norm backward); columns past `channels` are
    dbias's."""
    cdef double totals[REDUCE_COLUMNS]
    cdef Py_ssize_t block, c
    for c in range(stop - start):
        totals[c] = 0
    for block in range(blocks):
        for c in range(stop - start):
            totals[c] += partials[2 * block * channels + start + c]
    for c in range(start, stop):
        if c < channels:
            dweight[c] = <floating>totals[c - start]
        else:
            dbias[c - channels] = <floating>totals[c - start]


cdef void rows_backward(const floating* dy, const floating* x, const double* mean, const double* rstd,
                        const floating* weight, floating* dx, floating* dweight, floating* dbias,
                        Py_ssize_t n_rows, Py_ssize_t groups, Py_ssize_t chans_per_group, Py_ssize_t inner,
                        bint centered, bint stream, bint prefetch, int num_threads):
    cdef Py_ssize_t length = chans_per_group * inner
    cdef Py_ssize_t channels = groups * chans_per_group
    cdef Py_ssize_t n_samples = n_rows // groups
    cdef Py_ssize_t blocks, u, block, g, n, r, c, first, last, block_row, next_row, sub
    cdef Py_ssize_t ahead = rows_ahead(length * sizeof(floating), ROWS_AHEAD_BYTES)
    cdef bint short_rows = length <= SHORT_BACKWARD_ROW and inner == 1
    # float rows of a multiple of 16 values four at a time (see CYNORM_BACKWARD_QUAD_ROW); where dx streams, rows
    # of at most QUAD_STREAMED_ROW only, with streaming stores where dx starts a line (every row then starts one)
    # or, in AVX-512 builds, the rows are consecutive (rows4_backward)
    cdef bint quads = (floating is float and inner == 1 and not short_rows and length % 16 == 0
                       and ((CYNORM_HAVE_ROW_QUADS and length <= QUAD_STREAMED_ROW)
                            or (length <= CYNORM_BACKWARD_QUAD_ROW and not stream and not prefetch)
                            or (length <= min(<Py_ssize_t>QUAD_STREAMED_ROW, CYNORM_BACKWARD_QUAD_ROW)
                                and (<size_t>dx) % CYNORM_LINE_BYTES == 0)))
    cdef bint quad_stream = quads and stream and ((<size_t>dx) % CYNORM_LINE_BYTES == 0 or groups == 1)
    # groups of one channel of a few values four rows at a time (see CHANNEL_ROWS_INNER)
    cdef bint channel_rows = (floating is float and CYNORM_HAVE_CHANNEL_QUADS and chans_per_group == 1 and inner > 1
                              and inner <= CHANNEL_ROWS_INNER and not stream)
    cdef bint row_stream = stream and (not quads or quad_stream)
    # long rows, one element per channel: their parameter terms while dx is written (see FUSED_TERMS_ROW)
    cdef bint fused_terms = inner == 1 and length >= FUSED_TERMS_ROW
    # per thread: float running sums of dweight and dbias terms (one element per channel only), on lines of its own
    cdef Py_ssize_t run_stride = whole_lines((2 * length if inner == 1 else 2) * sizeof(floating)) // sizeof(floating)
    # per thread: the writer of its streamed dx, which takes its rows one after the other
    cdef char* writers
    cdef cynorm_stream_writer* writer
    cdef Scratch memory
    cdef double* partials
    cdef floating* running
    cdef floating* weight_run
    cdef floating* bias_run
    cdef double* weight_partial
    cdef double* bias_partial
    if n_rows == 0 or length == 0:
        memset(dweight, 0, channels * sizeof(floating))
        memset(dbias, 0, channels * sizeof(floating))
        return
    if inner == 1 and length >= LONG_ROW:
        long_rows_backward(dy, x, mean, rstd, weight, dx, dweight, dbias, n_rows, groups, length, centered, stream,
                           num_threads)
        return
    if inner > 1 and length >= LONG_ROW and n_rows < TILE_MULTIPLE:
        few_rows_backward(dy, x, mean, rstd, weight, dx, dweight, dbias, n_rows, groups, chans_per_group, inner,
                          centered, stream, num_threads)
        return
    # blocks of nearly equal size, a multiple of TILE_MULTIPLE of them (as the columns view's tiles): 5 blocks
    # left a thread idle for a fifth of a layer norm backward on rows of 24 or 100 values
    blocks = (n_samples * groups * length + BLOCK_ELEMS - 1) // BLOCK_ELEMS
    blocks = min(n_samples, (blocks + TILE_MULTIPLE - 1) // TILE_MULTIPLE * TILE_MULTIPLE)
    open_scratch(&memory, whole_lines(2 * blocks * channels * sizeof(double))
                 + num_threads * run_stride * sizeof(floating) + num_threads * WRITER_BYTES)
    # (each task clears its own, and the sums over the blocks are shared out after the tasks: one thread did both
    # around the parallel loop, and layer norm backwards ran 1.01-1.03x slower)
    partials = <double*>scratch_piece(&memory, 2 * blocks * channels * sizeof(double), False)
    running = <floating*>scratch_piece(&memory, num_threads * run_stride * sizeof(floating), True)
    writers = <char*>scratch_piece(&memory, num_threads * WRITER_BYTES, False)
    with nogil, parallel(num_threads=num_threads):
        writer = thread_writer(writers, threadid())
        for u in prange(blocks * groups, schedule="static"):
            block = u // groups
            g = u % groups
            weight_partial = &partials[2 * block * channels + g * chans_per_group]
            bias_partial = &partials[(2 * block + 1) * channels + g * chans_per_group]
            memset(weight_partial, 0, chans_per_group * sizeof(double))
            memset(bias_partial, 0, chans_per_group * sizeof(double))
            weight_run = &running[threadid() * run_stride]
            bias_run = weight_run + (length if inner == 1 else 1)
            first = block * n_samples // blocks
            last = (block + 1) * n_samples // blocks
            block_row = first * groups + g
            if short_rows:
                for sub in range((last - first + ROW_BLOCK - 1) // ROW_BLOCK):
                    n = first + sub * ROW_BLOCK
                    r = n * groups + g
                    short_rows_backward(&dy[r * length], &x[r * length], &dx[r * length], groups * length,
                                        min(<Py_ssize_t>ROW_BLOCK, last - n), length, &weight[g * chans_per_group],
                                        &mean[r] if mean != NULL else NULL, &rstd[r], groups, centered, weight_run,
                                        bias_run, weight_partial, bias_partial, stream, writer)
                continue
            n = first
            while quads and n + 4 <= last:
                r = n * groups + g
                for sub in range(4 if prefetch else 0):   # the rows `ahead` rows later, as below
                    next_row = r + (ahead + sub) * groups
                    if (n + ahead + sub < last or groups == 1) and next_row < n_rows:
                        cynorm_prefetch_lines(&dy[next_row * length], length * sizeof(floating))
                        cynorm_prefetch_lines(&x[next_row * length], length * sizeof(floating))
                rows4_backward(&dy[r * length], &x[r * length], &dx[r * length], groups * length, length,
                               &weight[g * chans_per_group], &mean[r] if mean != NULL else NULL, &rstd[r], groups,
                               centered, weight_run, bias_run, quad_stream, writer)
                n += 4
                # (the flushes of add_row_terms, which takes the rows left)
                if (n - first) % ROWS_PER_FLUSH == 0 or n == last:
                    flush_parameter_terms(weight_run, bias_run, weight_partial, bias_partial, length)
            while channel_rows and n + 4 <= last:
                r = n * groups + g
                channel_rows4_backward(&dy[r * length], &x[r * length], &dx[r * length], groups * length, length,
                                       &weight[g], &mean[r] if mean != NULL else NULL, &rstd[r], groups, centered,
                                       weight_partial, bias_partial)
                n += 4
            for n in range(n, last):
                r = n * groups + g
                # the row the thread takes `ahead` rows later: in this block, or with one group in its next
                # task (under the static schedule); none at the end of a block of several groups
                next_row = r + ahead * groups if n + ahead < last or groups == 1 else n_rows
                backward_row(&dy[r * length], &x[r * length], &dx[r * length], length, inner,
                             &weight[g * chans_per_group], mean[r] if mean != NULL else 0, rstd[r], centered,
                             weight_partial, bias_partial, row_stream,
                             &dy[next_row * length] if prefetch and next_row < n_rows else NULL,
                             &x[next_row * length] if prefetch and next_row < n_rows else NULL, NULL,
                             weight_run if fused_terms else NULL, bias_run if fused_terms else NULL, writer)
                if fused_terms:   # (as add_row_terms flushes)
                    if (n + 1 - first) % ROWS_PER_FLUSH == 0 or n == last - 1:
                        flush_parameter_terms(weight_run, bias_run, weight_partial, bias_partial, length)
                elif inner == 1:
                    add_row_terms(&dy[block_row * length], &x[block_row * length], groups * length, n - first,
                                  last - first, length, &mean[block_row] if mean != NULL else NULL,
                                  &rstd[block_row], groups, weight_run, bias_run, weight_partial, bias_partial)
        if stream:
            stream_flush(writer, dx)
            cynorm_store_fence()
        # (after the tasks' barrier) the blocks' partials added up, a range of columns per task
        for c in prange((2 * channels + REDUCE_COLUMNS - 1) // REDUCE_COLUMNS, schedule="static"):
            add_block_partials(partials, blocks, channels, c * REDUCE_COLUMNS,
                               min((c + 1) * REDUCE_COLUMNS, 2 * channels), dweight, dbias)
    free(memory.memory)


# The steps of the columns-view backward, each on one unit (as columns_forward's): the statistics of group s
# (group s % groups of sample s // groups), the gradient sums of tile u (tile u % tiles of sample u // tiles),
# the dx coefficients of sample n, the dx of tile u.

cdef inline void columns_group_statistics(const double* mean,   # IN  (n_samples * groups,), or NULL for zeros
                                          const double* rstd,   # IN  (n_samples * groups,)
                                          Py_ssize_t s, Py_ssize_t n_cols, Py_ssize_t groups, Py_ssize_t fold,
                                          floating* mean_hi, floating* mean_lo,
                                          floating* column_rstd) noexcept nogil:   # OUT (n_samples, stride)
    """The statistics of group s % groups of sample s // groups, in each of its columns, `fold` times and
    where the row's first values repeat (see constants_stride)."""
    cdef Py_ssize_t cols_per_group = n_cols // groups, col
    cdef Py_ssize_t stride = constants_stride(fold, n_cols, sizeof(floating)), first = (s // groups) * stride
    cdef Py_ssize_t first_col = (s % groups) * cols_per_group
    cdef double group_mean = mean[s] if mean != NULL else 0
    cdef floating hi = <floating>group_mean
    cdef floating lo = <floating>mean_beyond(group_mean, hi)
    for col in range(first + first_col, first + first_col + cols_per_group):
        mean_hi[col] = hi
        mean_lo[col] = lo
        column_rstd[col] = <floating>rstd[s]
    repeat_group_columns(mean_hi + first, n_cols, stride, first_col, cols_per_group)
    repeat_group_columns(mean_lo + first, n_cols, stride, first_col, cols_per_group)
    repeat_group_columns(column_rstd + first, n_cols, stride, first_col, cols_per_group)


cdef inline void columns_tile_gradient_sums(const floating* dy, const floating* x,   # IN (n_samples, n_rows, n_cols)
                                            Py_ssize_t u, Py_ssize_t tiles, Py_ssize_t tile_rows,
                                            Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t fold,
                                            const floating* mean_hi, const floating* mean_lo,
                                            const floating* column_rstd,   # IN  (n_samples, stride)
                                            bint affine_per_row, const floating* weight,
                                            bint prefetch,   # ask for the rows ahead, up to the sample's end
                                            floating* scratch,   # 2 * fold * n_cols
                                            double* tile_sums,   # OUT [u]: (2, n_cols)
                                            double* row_sums) noexcept nogil:  # OUT the tile's, if affine_per_row
    cdef Py_ssize_t n = u // tiles, a0 = (u % tiles) * tile_rows
    cdef Py_ssize_t offset = (n * n_rows + a0) * n_cols, first = n * constants_stride(fold, n_cols, sizeof(floating))
    columns_gradient_sums(dy + offset, x + offset, min(tile_rows, n_rows - a0), n_cols, fold, mean_hi + first,
                          mean_lo + first, column_rstd + first, affine_per_row,
                          weight + a0 if affine_per_row else weight, n_rows - a0 if prefetch else 0, scratch,
                          tile_sums + 2 * u * n_cols,
                          row_sums + 2 * n * n_rows + a0 if affine_per_row else row_sums,
                          row_sums + (2 * n + 1) * n_rows + a0 if affine_per_row else row_sums + 1)


cdef inline void columns_sample_coefficients(const double* tile_sums,   # IN  (n_samples, tiles, 2, n_cols)
                                             Py_ssize_t n, Py_ssize_t tiles, Py_ssize_t n_cols, Py_ssize_t groups,
                                             Py_ssize_t cols_per_channel, Py_ssize_t group_size,
                                             const double* rstd, const floating* weight, bint affine_per_row,
                                             bint centered, Py_ssize_t fold,
                                             const floating* mean_lo,   # IN  (n_samples, stride)
                                             double* column_sums,       # OUT (n_samples, 2, n_cols), zeroed
                                             double* channel_sums,      # OUT (n_samples, 2, channels), zeroed
                                             floating* scale, floating* coef_x,
                                             floating* coef_0) noexcept nogil:   # OUT (n_samples, stride)
    """Sample n's dx coefficients in each of its columns, `fold` times and where the row's first values repeat
    (see constants_stride)."""
    cdef Py_ssize_t stride = constants_stride(fold, n_cols, sizeof(floating)), first = n * stride
    sample_input_gradient_coefficients(tile_sums + 2 * n * tiles * n_cols, tiles, n_cols, groups, cols_per_channel,
                                       group_size, rstd + n * groups, weight, mean_lo + first, affine_per_row,
                                       centered, column_sums + 2 * n * n_cols,
                                       channel_sums + 2 * n * (n_cols // cols_per_channel), scale + first,
                                       coef_x + first, coef_0 + first)
    repeat_columns(scale + first, n_cols, stride)
    repeat_columns(coef_x + first, n_cols, stride)
    repeat_columns(coef_0 + first, n_cols, stride)


cdef inline void columns_tile_input_gradient(const floating* dy, const floating* x,   # IN  (n_samples, n_rows, n_cols)
                                             floating* dx,                            # OUT same
                                             Py_ssize_t u, Py_ssize_t tiles, Py_ssize_t tile_rows,
                                             Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t fold,
                                             const floating* mean_hi, const floating* scale,
                                             const floating* coef_x,
                                             const floating* coef_0,   # IN  (n_samples, stride)
                                             bint affine_per_row, const floating* weight,
                                             bint stream) noexcept nogil:
    cdef Py_ssize_t n = u // tiles, a0 = (u % tiles) * tile_rows
    cdef Py_ssize_t offset = (n * n_rows + a0) * n_cols, first = n * constants_stride(fold, n_cols, sizeof(floating))
    columns_input_gradient(dy + offset, x + offset, dx + offset, min(tile_rows, n_rows - a0) * n_cols, fold * n_cols,
                           mean_hi + first, scale + first, coef_x + first, coef_0 + first, affine_per_row,
                           weight + a0 if affine_per_row else weight, stream)


def backward_columns(size_t dy,        # IN  (n_samples * n_rows * n_cols,)
                     size_t x,         # IN  same
                     size_t mean,      # IN  (n_samples * groups,) float64, or 0 for zeros (not centered)
                     size_t rstd,      # IN  (n_samples * groups,) float64
                     size_t weight,    # IN  (n_rows,) if affine_per_row else (channels,)
                     size_t dx,        # OUT same as x
                     size_t dweight,   # OUT same shape as weight
                     size_t dbias,     # OUT same shape as weight
                     bint float64, Py_ssize_t n_samples, Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                     Py_ssize_t cols_per_channel, bint affine_per_row, bint centered, bint stream,
                     bint prefetch, int num_threads):
    """Columns view backward: per-column sums over tiles of rows, merged in tile order, then dx; samples
    in batches as in the forward.  The parameter gradients are summed over samples in float64, in order.
    `stream` and `prefetch` as for forward_rows."""
    if float64:
        columns_backward(<const double*>dy, <const double*>x, <const double*>mean, <const double*>rstd,
                         <const double*>weight, <double*>dx, <double*>dweight, <double*>dbias, n_samples, n_rows,
                         n_cols, groups, cols_per_channel, affine_per_row, centered, stream, prefetch, num_threads)
    else:
        columns_backward(<const float*>dy, <const float*>x, <const double*>mean, <const double*>rstd,
                         <const float*>weight, <float*>dx, <float*>dweight, <float*>dbias, n_samples, n_rows,
                         n_cols, groups, cols_per_channel, affine_per_row, centered, stream, prefetch, num_threads)


cdef void columns_backward(const floating* dy, const floating* x, const double* mean, const double* rstd,
                           const floating* weight, floating* dx, floating* dweight, floating* dbias,
                           Py_ssize_t n_samples, Py_ssize_t n_rows, Py_ssize_t n_cols, Py_ssize_t groups,
                           Py_ssize_t cols_per_channel, bint affine_per_row, bint centered, bint stream,
                           bint prefetch, int num_threads):
    cdef Py_ssize_t cols_per_group = n_cols // groups
    cdef Py_ssize_t channels = n_cols // cols_per_channel
    cdef Py_ssize_t tile_rows = rows_per_tile(n_rows, n_cols)
    cdef Py_ssize_t tiles = (n_rows + tile_rows - 1) // tile_rows
    cdef Py_ssize_t group_size = n_rows * cols_per_group
    cdef Py_ssize_t batch = samples_per_batch(2 * n_rows * n_cols)
    cdef Py_ssize_t batch_index, first, batch_size, u, n, a, part, part_first, part_end, part_lead
    # a tile's rows `fold` at a time, as rows of `wide` columns (see WIDE_ROW); the column arrays hold `wide`,
    # then their first values again (constants_stride)
    cdef Py_ssize_t fold = 1 if affine_per_row else rows_folded(n_cols)
    cdef Py_ssize_t wide = fold * n_cols
    cdef Py_ssize_t n_params = n_rows if affine_per_row else channels
    cdef Py_ssize_t tile_sums_bytes = 2 * n_samples * tiles * n_cols * sizeof(double)
    cdef Py_ssize_t column_sums_bytes = 2 * n_samples * n_cols * sizeof(double)
    cdef Py_ssize_t channel_sums_bytes = 2 * n_samples * channels * sizeof(double)
    cdef Py_ssize_t row_sums_bytes = (2 * n_samples * n_rows if affine_per_row else 2) * sizeof(double)
    cdef Py_ssize_t column_bytes = n_samples * constants_stride(fold, n_cols, sizeof(floating)) * sizeof(floating)
    cdef Py_ssize_t scratch_stride = whole_lines(2 * wide * sizeof(floating)) // sizeof(floating)   # a thread's
    cdef Scratch memory
    cdef double* tile_sums
    cdef double* column_sums
    cdef double* channel_sums
    cdef double* row_sums
    cdef floating* column_mean_hi
    cdef floating* column_mean_lo
    cdef floating* column_rstd
    cdef floating* column_scale
    cdef floating* column_coef_x
    cdef floating* column_coef_0
    cdef floating* scratch
    cdef double* weight_totals
    cdef double* bias_totals
    if n_samples == 0 or n_rows == 0 or n_cols == 0:
        memset(dweight, 0, n_params * sizeof(floating))
        memset(dbias, 0, n_params * sizeof(floating))
        return
    open_scratch(&memory, whole_lines(tile_sums_bytes) + whole_lines(column_sums_bytes)
                 + whole_lines(channel_sums_bytes) + whole_lines(row_sums_bytes) + 6 * whole_lines(column_bytes)
                 + num_threads * scratch_stride * sizeof(floating) + 2 * whole_lines(n_params * sizeof(double)))
    tile_sums = <double*>scratch_piece(&memory, tile_sums_bytes, False)   # [tile][sum(v*dy) | sum(v*dy*xhat)][col]
    column_sums = <double*>scratch_piece(&memory, column_sums_bytes, True)   # [sample][the same][col]
    # [sample][sum(dy) | sum(dy*xhat)][channel]
    channel_sums = <double*>scratch_piece(&memory, channel_sums_bytes, True)
    # [sample][sum(dy*xhat) | sum(dy)][row], needed only when the weight varies along the rows
    row_sums = <double*>scratch_piece(&memory, row_sums_bytes, False)
    # [sample][constants_stride]
    column_mean_hi = <floating*>scratch_piece(&memory, column_bytes, False)
    column_mean_lo = <floating*>scratch_piece(&memory, column_bytes, False)
    column_rstd = <floating*>scratch_piece(&memory, column_bytes, False)
    column_scale = <floating*>scratch_piece(&memory, column_bytes, False)
    column_coef_x = <floating*>scratch_piece(&memory, column_bytes, False)
    column_coef_0 = <floating*>scratch_piece(&memory, column_bytes, False)
    scratch = <floating*>scratch_piece(&memory, num_threads * scratch_stride * sizeof(floating), True)
    weight_totals = <double*>scratch_piece(&memory, n_params * sizeof(double), True)
    bias_totals = <double*>scratch_piece(&memory, n_params * sizeof(double), True)
    if n_samples % num_threads == 0 or n_samples >= 8 * num_threads:
        # Whole samples per thread, as in columns_forward (odd threads a sample ahead from samples of dy and x
        # of STAGGER_FROM_BYTES): each sample's dy and x are read for its sums, then for its dx while they are
        # still in cache, with no waiting between threads.  The sums of a sample are the same, in the same
        # order: the same bits.  Channels-last GroupNorm backward A/B, against every thread on each step of a
        # batch: (128,64,128) 1.14-1.27x, (32,676,10) 1.12-1.15x, (32,256,256) 1.06-1.25x, (16,1024,256)
        # 1.04-1.10x, (8,3136,256) 1.01-1.14x; InstanceNorm (8,16384,64) 0.96-1.05x.  On (8,3136,256) the
        # sample ahead gained 1.08-1.10x where memory was fast and lost 5-11 % where it was slow.
        with nogil, parallel(num_threads=num_threads):
            for part in prange(num_threads, schedule="static", chunksize=1):
                part_first = first_sample_of(part, n_samples, num_threads)
                part_end = first_sample_of(part + 1, n_samples, num_threads)
                part_lead = samples_ahead(part, 2 * n_rows * n_cols * sizeof(floating))
                for n in range(part_first, part_end + part_lead):
                    if n < part_end:
                        for u in range(n * groups, (n + 1) * groups):
                            columns_group_statistics(mean, rstd, u, n_cols, groups, fold, column_mean_hi,
                                                     column_mean_lo, column_rstd)
                        for u in range(n * tiles, (n + 1) * tiles):
                            columns_tile_gradient_sums(dy, x, u, tiles, tile_rows, n_rows, n_cols, fold,
                                                       column_mean_hi, column_mean_lo, column_rstd, affine_per_row,
                                                       weight, prefetch, &scratch[threadid() * scratch_stride],
                                                       tile_sums, row_sums)
                        columns_sample_coefficients(tile_sums, n, tiles, n_cols, groups, cols_per_channel,
                                                    group_size, rstd, weight, affine_per_row, centered, fold,
                                                    column_mean_lo, column_sums, channel_sums, column_scale,
                                                    column_coef_x, column_coef_0)
                    if n - part_lead >= part_first:
                        for u in range((n - part_lead) * tiles, (n - part_lead + 1) * tiles):
                            columns_tile_input_gradient(dy, x, dx, u, tiles, tile_rows, n_rows, n_cols, fold,
                                                        column_mean_hi, column_scale, column_coef_x, column_coef_0,
                                                        affine_per_row, weight, stream)
            if stream:
                cynorm_store_fence()
    else:
        with nogil, parallel(num_threads=num_threads):
            # A batch of samples at a time, every thread on each step of it (see columns_forward)
            for batch_index in range((n_samples + batch - 1) // batch):
                first = batch_index * batch
                batch_size = min(batch, n_samples - first)
                for u in prange(first * groups, (first + batch_size) * groups, schedule="static"):
                    columns_group_statistics(mean, rstd, u, n_cols, groups, fold, column_mean_hi, column_mean_lo,
                                             column_rstd)
                for u in prange(first * tiles, (first + batch_size) * tiles, schedule="static"):
                    columns_tile_gradient_sums(dy, x, u, tiles, tile_rows, n_rows, n_cols, fold, column_mean_hi,
                                               column_mean_lo, column_rstd, affine_per_row, weight, prefetch,
                                               &scratch[threadid() * scratch_stride], tile_sums, row_sums)
                for n in prange(first, first + batch_size, schedule="static"):
                    columns_sample_coefficients(tile_sums, n, tiles, n_cols, groups, cols_per_channel, group_size,
                                                rstd, weight, affine_per_row, centered, fold, column_mean_lo,
                                                column_sums, channel_sums, column_scale, column_coef_x,
                                                column_coef_0)
                for u in prange(first * tiles, (first + batch_size) * tiles, schedule="static"):
                    columns_tile_input_gradient(dy, x, dx, u, tiles, tile_rows, n_rows, n_cols, fold,
                                                column_mean_hi, column_scale, column_coef_x, column_coef_0,
                                                affine_per_row, weight, stream)
            if stream:
                cynorm_store_fence()
    with nogil:
        # parameter gradients: samples summed in order
        if affine_per_row:
            add_samples_in_order(row_sums, n_samples, 2 * n_rows, n_rows, weight_totals)
            add_samples_in_order(row_sums + n_rows, n_samples, 2 * n_rows, n_rows, bias_totals)
        else:
            add_samples_in_order(channel_sums + channels, n_samples, 2 * channels, channels, weight_totals)
            add_samples_in_order(channel_sums, n_samples, 2 * channels, channels, bias_totals)
        for a in range(n_params):
            dweight[a] = <floating>weight_totals[a]
            dbias[a] = <floating>bias_totals[a]
    free(memory.memory)


cdef inline void add_samples_in_order(const double* sums,   # IN  sample n's values from n * stride
                                      Py_ssize_t n_samples, Py_ssize_t stride, Py_ssize_t count,
                                      double* totals) noexcept nogil:   # INOUT (count,), zeros on entry
    """totals[a] += sums[n * stride + a] for the samples n in order: each total's adds are those of a loop over
    its samples, taken a sample's values at a time, reads that follow each other and vectorize (a value's samples
    at a time read a line a sample, and took 88 µs of a channels-last GroupNorm (16,4,4,2560) backward on one
    thread, while the other waited)."""
    cdef Py_ssize_t n, a
    for n in range(n_samples):
        for a in range(count):
            totals[a] += sums[n * stride + a]


cdef inline void sample_input_gradient_coefficients(
        const double* tile_sums,      # IN  (tiles, 2, n_cols) of one sample
        Py_ssize_t tiles, Py_ssize_t n_cols, Py_ssize_t groups, Py_ssize_t cols_per_channel,
        Py_ssize_t group_size,
        const double* rstd,           # IN  (groups,) of the sample
        const floating* weight,       # IN  (channels,) unless affine_per_row
        const floating* mean_lo,      # IN  (n_cols,) low part of each column's mean
        bint affine_per_row, bint centered,
        double* column_sums,          # OUT (2, n_cols), zero on entry
        double* channel_sums,         # OUT (2, channels), zero on entry
        floating* scale, floating* coef_x, floating* coef_0) noexcept nogil:  # OUT (n_cols,)
    """Merges a sample's tile sums in order and turns them into the per-column dx coefficients."""
    cdef Py_ssize_t t, col, g, channel
    cdef Py_ssize_t cols_per_group = n_cols // groups
    cdef Py_ssize_t channels = n_cols // cols_per_channel
    cdef Py_ssize_t chans_per_group = cols_per_group // cols_per_channel
    cdef double k1, k2, r
    for t in range(tiles):
        for col in range(2 * n_cols):
            column_sums[col] += tile_sums[2 * t * n_cols + col]
    if affine_per_row:
        # every column is its own group; the weight varies along the reduced rows
        for col in range(n_cols):
            r = rstd[col]
            k1 = column_sums[col] / group_size
            k2 = column_sums[n_cols + col] / group_size
            scale[col] = <floating>r
            coef_x[col] = <floating>(-r * r * k2)
            coef_0[col] = <floating>(((-r * k1) if centered else 0.0) + r * r * k2 * mean_lo[col])
        return
    for col in range(n_cols):
        channel = col // cols_per_channel
        channel_sums[channel] += column_sums[col]
        channel_sums[channels + channel] += column_sums[n_cols + col]
    for g in range(groups):
        k1 = 0
        k2 = 0
        for channel in range(g * chans_per_group, (g + 1) * chans_per_group):
            k1 += weight[channel] * channel_sums[channel]
            k2 += weight[channel] * channel_sums[channels + channel]
        k1 /= group_size
        k2 /= group_size
        r = rstd[g]
        for col in range(g * cols_per_group, (g + 1) * cols_per_group):
            scale[col] = <floating>(r * weight[col // cols_per_channel])
            coef_x[col] = <floating>(-r * r * k2)
            coef_0[col] = <floating>(((-r * k1) if centered else 0.0) + r * r * k2 * mean_lo[col])


cdef inline void columns_gradient_sums(const floating* dy, const floating* x,   # IN (rows, n_cols)
                                       Py_ssize_t rows, Py_ssize_t n_cols, Py_ssize_t fold,
                                       const floating* mean_hi, const floating* mean_lo,
                                       const floating* rs,   # IN (fold * n_cols,) each column's, `fold` times
                                       bint affine_per_row, const floating* row_weight,
                                       Py_ssize_t readable_rows,
                                       floating* scratch,          # 2 * fold * n_cols
                                       double* out,                # OUT (2, n_cols): sum(v*dy), sum(v*dy*xhat)
                                       double* row_dy_xhat,        # OUT (rows,) if affine_per_row
                                       double* row_dy) noexcept nogil:  # OUT (rows,) if affine_per_row
    """Per-column gradient sums over a tile; v is the row's weight when the weight varies along rows, else 1.
    Rows ahead are prefetched up to row `readable_rows` of dy and x (0: no prefetching).  Without a weight
    along the rows, the rows are taken `fold` at a time, as rows of fold * n_cols columns (see WIDE_ROW), the
    rows left over one at a time; each column's sums are those of its `fold` wide columns, added in order."""
    cdef Py_ssize_t width = fold * n_cols, wide_rows = rows // fold, readable_wide_rows = readable_rows // fold
    cdef floating* s1 = scratch
    cdef floating* s2 = scratch + width
    cdef floating l1[LANES]
    cdef floating l2[LANES]
    cdef floating xhat, v, tail1, tail2
    cdef Py_ssize_t a, col, step, quad, body = n_cols - n_cols % LANES, c0, blk, block_width, done
    cdef Py_ssize_t ahead = rows_ahead(width * sizeof(floating), PREFETCH_AHEAD_BYTES)
    cdef Py_ssize_t quads = 0 if rows_one_at_a_time(width * sizeof(floating), readable_wide_rows) else wide_rows // 4
    cdef double sum1, sum2
    cdef floating b1[COLUMN_BLOCK]
    cdef floating b2[COLUMN_BLOCK]
    cdef const floating* dyr
    cdef const floating* xr
    cdef int j
    memset(scratch, 0, 2 * width * sizeof(floating))
    # sum(v * dy * (x - mean_hi)); rstd and the low part of the mean are applied once, at the end.  (Few
    # pointers in the loops that write through one: the compiler checks each pair for overlap before it
    # vectorizes: a loop that also summed the row's own terms ran one value at a time.)
    if not affine_per_row:
        # The whole vectors of columns in registers, as tile_moments_around takes them.
        if floating is float:
            done = cynorm_gradient_strips_float(dy, x, wide_rows, width, readable_wide_rows, ahead, mean_hi, s1, s2)
        else:
            done = cynorm_gradient_strips_double(dy, x, wide_rows, width, readable_wide_rows, ahead, mean_hi, s1,
                                                 s2)
        # The columns left four rows at a time, each column's sums still taken row after row, and the rows
        # ahead asked for (backward on (16,1024,64) 1.28-1.65x; neutral from 256 columns on); wide rows asked
        # for ahead, one at a time (see rows_one_at_a_time).  The sums of COLUMN_BLOCK columns at a time are kept
        # in local arrays, which no pointer can reach: the compiler vectorizes the loop without checking the
        # pointers for overlap, as it had every four rows (rows of 32 columns 1.1x).
        for blk in range((width - done + COLUMN_BLOCK - 1) // COLUMN_BLOCK):
            c0 = done + blk * COLUMN_BLOCK
            block_width = min(<Py_ssize_t>COLUMN_BLOCK, width - c0)
            for col in range(block_width):
                b1[col] = 0
                b2[col] = 0
            for quad in range(quads):
                dyr = dy + 4 * quad * width + c0
                xr = x + 4 * quad * width + c0
                if c0 == 0:   # (as in tile_moments_around)
                    for a in range(4 * quad, 4 * quad + 4):
                        if a + ahead < readable_wide_rows:
                            cynorm_prefetch_lines(dy + (a + ahead) * width, width * sizeof(floating))
                            cynorm_prefetch_lines(x + (a + ahead) * width, width * sizeof(floating))
                for col in range(block_width):
                    b1[col] = (((b1[col] + dyr[col]) + dyr[width + col]) + dyr[2 * width + col]) + dyr[3 * width + col]
                    b2[col] = ((((b2[col] + dyr[col] * (xr[col] - mean_hi[c0 + col]))
                                 + dyr[width + col] * (xr[width + col] - mean_hi[c0 + col]))
                                + dyr[2 * width + col] * (xr[2 * width + col] - mean_hi[c0 + col]))
                               + dyr[3 * width + col] * (xr[3 * width + col] - mean_hi[c0 + col]))
            for a in range(4 * quads, wide_rows):
                dyr = dy + a * width + c0
                xr = x + a * width + c0
                if c0 == 0 and a + ahead < readable_wide_rows:
                    cynorm_prefetch_lines(dy + (a + ahead) * width, width * sizeof(floating))
                    cynorm_prefetch_lines(x + (a + ahead) * width, width * sizeof(floating))
                for col in range(block_width):
                    b1[col] += dyr[col]
                    b2[col] += dyr[col] * (xr[col] - mean_hi[c0 + col])
            for col in range(block_width):
                s1[c0 + col] = b1[col]
                s2[c0 + col] = b2[col]
        for a in range(wide_rows * fold, rows):
            dyr = dy + a * n_cols
            xr = x + a * n_cols
            for col in range(n_cols):
                s1[col] += dyr[col]
                s2[col] += dyr[col] * (xr[col] - mean_hi[col])
    else:
        for a in range(rows):
            dyr = dy + a * n_cols
            xr = x + a * n_cols
            v = row_weight[a]
            for col in range(n_cols):
                s1[col] += v * dyr[col]
                s2[col] += v * dyr[col] * (xr[col] - mean_hi[col])
            # the row's own sums, for the gradient of its weight and bias (only local lanes written)
            tail1 = 0
            tail2 = 0
            for j in range(LANES):
                l1[j] = 0
                l2[j] = 0
            for step in range(body // LANES):
                col = step * LANES
                for j in range(LANES):
                    xhat = ((xr[col + j] - mean_hi[col + j]) - mean_lo[col + j]) * rs[col + j]
                    l1[j] += dyr[col + j] * xhat
                    l2[j] += dyr[col + j]
            for col in range(body, n_cols):
                xhat = ((xr[col] - mean_hi[col]) - mean_lo[col]) * rs[col]
                tail1 += dyr[col] * xhat
                tail2 += dyr[col]
            row_dy_xhat[a] = lanes_total(l1, tail1)
            row_dy[a] = lanes_total(l2, tail2)
    for col in range(n_cols):
        sum1 = s1[col]
        sum2 = rs[col] * (<double>s2[col] - <double>mean_lo[col] * s1[col])
        for j in range(1, fold):
            sum1 += s1[j * n_cols + col]
            sum2 += rs[col] * (<double>s2[j * n_cols + col] - <double>mean_lo[col] * s1[j * n_cols + col])
        out[col] = sum1
        out[n_cols + col] = sum2


cdef inline void input_gradient_tile_row(const floating* dy, const floating* x, floating* dx,  # (n,) of a row
                                         Py_ssize_t n, const floating* mean_hi,   # (n,) per column
                                         const floating* scale, const floating* coef_x,
                                         const floating* coef_0,                  # (n,) per column
                                         bint affine_per_row, floating v) noexcept nogil:
    cdef Py_ssize_t col
    if affine_per_row:
        for col in range(n):
            dx[col] = (scale[col] * v) * dy[col] + coef_x[col] * (x[col] - mean_hi[col]) + coef_0[col]
    else:
        for col in range(n):
            dx[col] = scale[col] * dy[col] + coef_x[col] * (x[col] - mean_hi[col]) + coef_0[col]


cdef inline void columns_input_gradient(const floating* dy, const floating* x, floating* dx,  # (values,)
                                        Py_ssize_t values, Py_ssize_t width,   # rows of `width` values, the last
                                        const floating* mean_hi,               # perhaps cut short
                                        const floating* scale, const floating* coef_x, const floating* coef_0,
                                        bint affine_per_row, const floating* row_weight,
                                        bint stream) noexcept nogil:
    """dx of a tile, as rows of `width` values with per-column arrays of `width` values, then their first
    values again (a row of the tile, or several folded into one, see WIDE_ROW; constants_stride), with streaming
    stores if `stream`, a line of the contiguous tile at a time, as normalize_tile writes y.  The caller fences
    the streamed stores."""
    cdef floating space[STREAM_BLOCK + STAGING_SLACK]
    cdef floating* buffer
    cdef Py_ssize_t a, col, n, start, stop, position
    cdef floating v = 1
    if not stream:
        # (whole rows with the width fixed, then the piece left: a width that varied row by row measured 4 %
        # slower on (2,4096,320))
        for a in range(values // width):
            if affine_per_row:
                v = row_weight[a]
            input_gradient_tile_row(dy + a * width, x + a * width, dx + a * width, width, mean_hi, scale, coef_x,
                                    coef_0, affine_per_row, v)
        a = values // width
        if values > a * width:
            if affine_per_row:
                v = row_weight[a]
            input_gradient_tile_row(dy + a * width, x + a * width, dx + a * width, values - a * width, mean_hi, scale,
                                    coef_x, coef_0, affine_per_row, v)
        return
    if not affine_per_row:
        if floating is float:
            cynorm_input_gradient_tile_streamed_float(dy, x, dx, values, width, mean_hi, scale, coef_x, coef_0)
        else:
            cynorm_input_gradient_tile_streamed_double(dy, x, dx, values, width, mean_hi, scale, coef_x, coef_0)
        return
    start = 0
    while start < values:
        stop = streamed_block_end(dx, start, values)
        buffer = staged_block(space, start, stop, width)
        position = start
        while position < stop:   # the pieces of rows in [start, stop)
            a = position // width
            col = position - a * width
            n = min(width - col, stop - position)
            if affine_per_row:
                v = row_weight[a]
            input_gradient_tile_row(dy + position, x + position, buffer + (position - start), n, mean_hi + col,
                                    scale + col, coef_x + col, coef_0 + col, affine_per_row, v)
            position += n
        stream_copy(dx + start, buffer, stop - start)
        start = stop
