/* out[m, n] = sum_k w[n, k] * x[m, k] + bias[n], for 1 to 8 input rows, on AVX2 + FMA.
 *
 * Decode multiplies a handful of rows (one per sequence in the batch) by every weight matrix.
 * Each weight row is read from memory once, widened to float32 if it is bfloat16 (a shift: bf16
 * is the top half of a float32), and multiplied by every input row while it sits in a register;
 * the input rows (widened to float32 once, at most 8 x K) stay in L1. Sums are float32 and each
 * output is rounded once, to nearest even, as torch rounds. Weight rows are split across OpenMP
 * threads: torch's own runtime, as many as torch.get_num_threads() says.
 *
 * Built on first use by kernelhub/backends/skinny_linear.py with the system C compiler.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m256 load_f32(const char *row, int64_t k) { return _mm256_loadu_ps((const float *)row + k); }
static inline __m256 load_bf16(const char *row, int64_t k) {
    __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)row + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
}
static inline float get_f32(const char *row, int64_t k) { return ((const float *)row)[k]; }
static inline float get_bf16(const char *row, int64_t k) {
    uint32_t bits = (uint32_t)((const uint16_t *)row)[k] << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}
static inline void put_f32(char *out, int64_t i, float v) { ((float *)out)[i] = v; }
static inline void put_bf16(char *out, int64_t i, float v) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, 4);
    /* round to nearest even, and NaN to torch's quiet NaN, as c10::BFloat16 does */
    ((uint16_t *)out)[i] = (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (bits + 0x7fffu + ((bits >> 16) & 1)) >> 16;
}
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* One function per row count M and weight type, so the accumulators live in registers. An FMA's
 * result is ready ~4-5 cycles after it issues and two issue per cycle, so about 10 independent
 * chains keep the units busy: with few rows, each row sums A interleaved column blocks. */
#define DEFINE(NAME, M, A, LOAD, GET, PUT, ESIZE)                                               \
    static void NAME(const char *w, const float *x, const char *bias, char *out, int64_t N,     \
                     int64_t K, int threads) {                                                  \
        int64_t K8 = K & ~(int64_t)7, KA = K - K % (8 * A);                                     \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                       \
        for (int64_t n = 0; n < N; n++) {                                                       \
            const char *row = w + n * K * ESIZE;                                                \
            __m256 acc[M][A];                                                                   \
            for (int m = 0; m < M; m++)                                                         \
                for (int a = 0; a < A; a++) acc[m][a] = _mm256_setzero_ps();                    \
            for (int64_t k = 0; k < KA; k += 8 * A)                                             \
                for (int a = 0; a < A; a++) {                                                   \
                    __m256 wv = LOAD(row, k + 8 * a);                                           \
                    for (int m = 0; m < M; m++)                                                 \
                        acc[m][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k + 8 * a), \
                                                    acc[m][a]);                                 \
                }                                                                               \
            for (int64_t k = KA; k < K8; k += 8) {                                              \
                __m256 wv = LOAD(row, k);                                                       \
                for (int m = 0; m < M; m++)                                                     \
                    acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[m][0]); \
            }                                                                                   \
            for (int m = 0; m < M; m++) {                                                       \
                for (int a = 1; a < A; a++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][a]);    \
                float s = hsum(acc[m][0]);                                                      \
                for (int64_t k = K8; k < K; k++) s += GET(row, k) * x[m * K + k];               \
                PUT(out, m * N + n, bias ? s + GET(bias, n) : s);                               \
            }                                                                                   \
        }                                                                                       \
    }
#define BOTH(M, A) DEFINE(f32_##M, M, A, load_f32, get_f32, put_f32, 4) \
                   DEFINE(bf16_##M, M, A, load_bf16, get_bf16, put_bf16, 2)
BOTH(1, 8) BOTH(2, 4) BOTH(3, 2) BOTH(4, 2) BOTH(5, 1) BOTH(6, 1) BOTH(7, 1) BOTH(8, 1)

typedef void (*kernel)(const char *, const float *, const char *, char *, int64_t, int64_t, int);
static const kernel F32[8] = {f32_1, f32_2, f32_3, f32_4, f32_5, f32_6, f32_7, f32_8};
static const kernel BF16[8] = {bf16_1, bf16_2, bf16_3, bf16_4, bf16_5, bf16_6, bf16_7, bf16_8};

/* w: [N, K] row-major; x: [M, K]; bias: [N] or NULL; out: [M, N]; all float32 (bf16 = 0) or all
 * bfloat16 (bf16 = 1). threads: how many OpenMP threads to run (the setting is per calling thread,
 * so the caller passes torch's). Returns 0, -1 for M outside 1..8, -2 when memory runs out. */
int skinny_linear(const void *w, int bf16, const void *x, const void *bias, void *out, int64_t M,
                  int64_t N, int64_t K, int threads) {
    if (M < 1 || M > 8) return -1;
    const float *xf = (const float *)x;
    float *widened = NULL;
    if (bf16) {
        if (!(widened = malloc((size_t)(M * K) * sizeof(float)))) return -2;
        for (int64_t i = 0; i < M * K; i++) widened[i] = get_bf16((const char *)x, i);
        xf = widened;
    }
    (bf16 ? BF16 : F32)[M - 1]((const char *)w, xf, (const char *)bias, (char *)out, N, K, threads < 1 ? 1 : threads);
    free(widened);
    return 0;
}
