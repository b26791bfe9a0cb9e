/* Products with GGUF (ggml) quantised weights, read in their packed blocks, on AVX2 + FMA or AVX-512.
 *
 * A weight is [N, row_bytes] bytes: each row is its K / block_size blocks, as a GGUF file stores
 * them. Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (blocks of 32 values) and Q4_K, Q5_K, Q6_K (256).
 *
 * gguf_mul_mat: out[m, n] = sum_k W[n, k] * x[m, k] (+ bias[n]) for 1 to 8 float32 input rows.
 * Each weight row is read from memory once: every 32 values of it are unpacked to small integers
 * and turned into float32 weights in registers, w = q * scale + offset with one rounding, which is
 * bit for bit the float32 weight ggml's (and gguf-py's) dequantisation gives (an fp16 scale times
 * integers of a few bits is exact in float32), then multiplied by every input row while they are
 * in registers. The activations stay float32 (ggml's own CPU kernels quantise them to 8 bits, an
 * error far above float32 rounding); sums are float32 and each output is rounded once.
 * Rows are split across OpenMP threads: torch's runtime, as many as the caller passes
 * (torch.get_num_threads()).
 *
 * gguf_dequantize: the float32 values of chosen rows (all rows, or the rows `ids` names).
 *
 * Built on first use by kernelhub/backends/gguf_quant.py with the system C compiler, twice where
 * the CPU has AVX-512: the unpacking of each type lives in gguf_unpack_avx512.h (16 values a
 * register) or gguf_unpack_avx2.h (8), chosen by the flags it is compiled with; the rest is one
 * code for both, written over `vec`, a register of LANES float32 values.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))

/* ggml type ids (enum ggml_type in ggml.h) */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

AI float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
AI uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* An IEEE half, widened exactly, subnormals, infinities and NaN included (F16C would do it in one
 * instruction, but it is not part of AVX2). */
static float widen_half(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return from_bits(sign | (two_w < (1u << 27) ? to_bits(subnormal) : to_bits(normal)));
}

/* Every half's float, as ggml keeps them (256 KB, of which a matrix's scales touch a few lines): a
 * block's scale is then one broadcast from memory. Filled when the library is loaded. */
static float HALF[1 << 16];
__attribute__((constructor)) static void fill_half(void) {
    for (uint32_t h = 0; h < (1u << 16); h++) HALF[h] = widen_half((uint16_t)h);
}
AI const float *half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return HALF + h;
}
AI __m256 half8(const uint8_t *p) { return _mm256_broadcast_ss(half_at(p)); }

/* The register the products run on: 16 float32 lanes with AVX-512, 8 with AVX2. */
#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
typedef __m512i ivec;
#define VZERO() _mm512_setzero_ps()
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VLOAD(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VCVT(q) _mm512_cvtepi32_ps(q)
#define VSUM(v) _mm512_reduce_add_ps(v)
AI vec half_v(const uint8_t *p) { return _mm512_set1_ps(*half_at(p)); }
#else
#define LANES 8
typedef __m256 vec;
typedef __m256i ivec;
#define VZERO() _mm256_setzero_ps()
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VLOAD(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VCVT(q) _mm256_cvtepi32_ps(q)
static inline float VSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AI vec half_v(const uint8_t *p) { return half8(p); }
#endif
#define GROUPS (32 / LANES) /* registers of 32 values */

/* Where 32 consecutive weights go. Matrix products (dst NULL) multiply them by M input rows at
 * column k and add into acc (M rows of A accumulators: several independent sums per row keep both
 * FMA units busy when there are few rows); dequantisation (dst set) stores them at dst + k. */
typedef struct {
    vec *acc;
    const float *x;
    int64_t K;
    float *dst;
} sink;

/* 32 float32 weights (w[g]: values LANES * g .. LANES * g + LANES - 1) at column k into t. Register
 * g adds into accumulator (P + g) % A of each row: callers alternate P between 0 and GROUPS from
 * one 32 values to the next, so that every accumulator takes its turn when there are more
 * accumulators than registers of 32 values. */
AI void take(sink t, const int M, const int A, const int P, int64_t k, const vec *w) {
    if (t.dst) {
        for (int g = 0; g < GROUPS; g++) VSTORE(t.dst + k + LANES * g, w[g]);
        return;
    }
    for (int g = 0; g < GROUPS; g++)
        for (int m = 0; m < M; m++) {
            vec *acc = t.acc + m * A + (P + g) % A;
            *acc = VFMA(w[g], VLOAD(t.x + m * t.K + k + LANES * g), *acc);
        }
}

/* 32 weights from integers q[g] (as `take` orders them): values 0..15 become s0 * q + o0, values
 * 16..31 s1 * q + o1. */
AI void eat(sink t, const int M, const int A, const int P, int64_t k, const ivec *q, vec s0, vec o0, vec s1,
            vec o1) {
    vec w[GROUPS];
    for (int g = 0; g < GROUPS; g++)
        w[g] = VFMA(VCVT(q[g]), g < GROUPS / 2 ? s0 : s1, g < GROUPS / 2 ? o0 : o1);
    take(t, M, A, P, k, w);
}

/* The eight 6-bit scales and minimums of Q4_K / Q5_K, packed in 12 bytes (ggml's get_scale_min_k4,
 * unpacked four at a time in 32-bit words as ggml's AVX2 code does): the values of sub-block j (32
 * values) are d * scale[j] * q - dmin * min[j]. Kept in memory, from where they are broadcast. */
AI void k_scales(const uint8_t *b, float *scale, float *offset) {
    uint32_t u[3];
    memcpy(u, b + 4, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    /* built in registers: a vector load of words just stored one by one would stall on forwarding */
    const __m128i scales = _mm_set_epi32(0, 0, (int)((u[2] & four) | (((u[0] >> 6) & two) << 4)), (int)(u[0] & six));
    const __m128i mins = _mm_set_epi32(0, 0, (int)(((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4)),
                                       (int)(u[1] & six));
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(scales));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mins));
    _mm256_storeu_ps(scale, _mm256_mul_ps(half8(b), sc));
    _mm256_storeu_ps(offset, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(half8(b + 2), mn)));
    __asm__ volatile("" ::: "memory"); /* broadcast them back from memory (a load), not by shuffles */
}

/* Q6_K's sixteen signed 8-bit scales (bytes 192..207) times d (bytes 208..209), and the offset
 * -32 * scale of each: values of 16 are d * scale[i] * (q - 32). */
AI void q6_scales(const uint8_t *b, float *scale, float *offset) {
    for (int i = 0; i < 2; i++) {
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 192 + 8 * i))));
        const __m256 f = _mm256_mul_ps(half8(b + 208), sc);
        _mm256_storeu_ps(scale + 8 * i, f);
        _mm256_storeu_ps(offset + 8 * i, _mm256_mul_ps(f, _mm256_set1_ps(-32.0f)));
    }
    __asm__ volatile("" ::: "memory"); /* as in k_scales */
}

#if defined(__AVX512F__)
#include "gguf_unpack_avx512.h"
#else
#include "gguf_unpack_avx2.h"
#endif

/* The blocks of one row that hold values k0..k1 (multiples of the block size), into t. Each block
 * asks for the cache lines PREFETCH bytes ahead: a core streaming one row at a time keeps too few
 * reads in flight on the hardware prefetcher alone (measured: about 1.3x faster at one input row,
 * with 4 KB ahead against 2 KB or none). Past a row's end it fetches the next row, which is read
 * next; a prefetch never faults. */
#define PREFETCH 4096
AI void fetch_ahead(const uint8_t *block, const int size) {
    for (int line = 0; line < (size + 63) / 64; line++) _mm_prefetch((const char *)block + PREFETCH + 64 * line, _MM_HINT_T0);
}
/* Blocks of 32 values go in pairs, the second adding into the accumulators the first left alone. */
#define ROW(NAME, QK, SIZE)                                                                        \
    AI void row_##NAME(sink t, const int M, const int A, const uint8_t *row, int64_t k0, int64_t k1) { \
        int64_t i = k0 / QK;                                                                       \
        for (; QK == 32 && i + 1 < k1 / QK; i += 2) {                                              \
            fetch_ahead(row + i * SIZE, 2 * SIZE);                                                 \
            block_##NAME(t, M, A, 0, i * QK, row + i * SIZE);                                      \
            block_##NAME(t, M, A, GROUPS, (i + 1) * QK, row + (i + 1) * SIZE);                     \
        }                                                                                          \
        for (; i < k1 / QK; i++) {                                                                 \
            fetch_ahead(row + i * SIZE, SIZE);                                                     \
            block_##NAME(t, M, A, 0, i * QK, row + i * SIZE);                                      \
        }                                                                                          \
    }
ROW(q4_0, 32, 18) ROW(q4_1, 32, 20) ROW(q5_0, 32, 22) ROW(q5_1, 32, 24) ROW(q8_0, 32, 34)
ROW(q4_k, 256, 144) ROW(q5_k, 256, 176) ROW(q6_k, 256, 210)

static inline uint16_t to_bf16(float v) {
    const uint32_t bits = to_bits(v);
    /* round to nearest even, and NaN to torch's quiet NaN, as c10::BFloat16 does */
    return (bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0 : (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}

typedef void (*matmul)(const uint8_t *, int64_t, const float *, const float *, void *, int, int64_t, int64_t,
                       int);

/* Every weight is multiplied by M input values, read from the cache: from L1 a core keeps both FMA
 * units busy, from L2 only about one. So the input rows are taken a span of columns at a time, a
 * span whose M rows fill at most X_SPAN bytes (half of a 48 KB L1), and a group of GROUP weight
 * rows is run over each span in turn, their sums set aside between spans. Spans are whole 256-value
 * blocks; where one span holds all K columns, rows run one by one. */
#define X_SPAN 24576
#define GROUP 8
static int64_t span(int64_t M, int64_t K) {
    const int64_t cols = X_SPAN / (4 * M) / 256 * 256;
    return cols >= K ? K : cols;
}

/* The rows this thread of a parallel region takes, a contiguous share of whole groups. A share of a
 * small matrix is read in a few microseconds, too soon for the hardware prefetcher to ramp up: its
 * first PREFETCH bytes are asked for at once. */
static int64_t share(int64_t N, int64_t group, int edge) {
    const int64_t groups = (N + group - 1) / group, threads = omp_get_num_threads();
    const int64_t row = groups * (omp_get_thread_num() + edge) / threads * group;
    return row < N ? row : N;
}
static int64_t first_row(int64_t N, int64_t group, int64_t row_bytes, const uint8_t *w) {
    const int64_t n0 = share(N, group, 0), bytes = (share(N, group, 1) - n0) * row_bytes;
    for (int64_t at = 0; at < (bytes < PREFETCH ? bytes : PREFETCH); at += 64)
        _mm_prefetch((const char *)w + n0 * row_bytes + at, _MM_HINT_T0);
    return n0;
}
static int64_t last_row(int64_t N, int64_t group) { return share(N, group, 1); }

/* One function per type and row count M, so the accumulators live in registers: 4 independent
 * sums per row for 1 or 2 rows, 2 for 3 or 4, and from 5 rows on 1 with AVX2 (16 ymm registers in
 * all) or 2 with AVX-512 (32 zmm registers). */
#define MATMUL(NAME, M)                                                                            \
    static void NAME##_##M(const uint8_t *w, int64_t row_bytes, const float *x, const float *bias, \
                           void *out, int bf16, int64_t N, int64_t K, int threads) {               \
        enum { A = M <= 2 ? 4 : M <= 4 || LANES == 16 ? 2 : 1 };                                   \
        const int64_t cols = span(M, K), group = cols < K ? GROUP : 1;                             \
        _Pragma("omp parallel num_threads(threads)")                                               \
        for (int64_t n0 = first_row(N, group, row_bytes, w), end = last_row(N, group); n0 < end; n0 += group) { \
            const int64_t n1 = n0 + group < N ? n0 + group : N;                                    \
            vec kept[GROUP][M * A];                                                                \
            for (int64_t k0 = 0; k0 < K; k0 += cols) {                                             \
                const int64_t k1 = k0 + cols < K ? k0 + cols : K;                                  \
                for (int64_t n = n0; n < n1; n++) {                                                \
                    vec acc[M * A];                                                                \
                    for (int i = 0; i < M * A; i++) acc[i] = k0 ? kept[n - n0][i] : VZERO();       \
                    row_##NAME((sink){acc, x, K, NULL}, M, A, w + n * row_bytes, k0, k1);          \
                    if (k1 < K) {                                                                  \
                        for (int i = 0; i < M * A; i++) kept[n - n0][i] = acc[i];                  \
                        continue;                                                                  \
                    }                                                                              \
                    for (int m = 0; m < M; m++) {                                                  \
                        for (int a = 1; a < A; a++) acc[m * A] = VADD(acc[m * A], acc[m * A + a]); \
                        const float s = VSUM(acc[m * A]) + (bias ? bias[n] : 0.0f);                \
                        if (bf16) ((uint16_t *)out)[m * N + n] = to_bf16(s);                       \
                        else ((float *)out)[m * N + n] = s;                                        \
                    }                                                                              \
                }                                                                                  \
            }                                                                                      \
        }                                                                                          \
    }

#define TYPE(NAME)                                                                                 \
    MATMUL(NAME, 1) MATMUL(NAME, 2) MATMUL(NAME, 3) MATMUL(NAME, 4)                                \
    MATMUL(NAME, 5) MATMUL(NAME, 6) MATMUL(NAME, 7) MATMUL(NAME, 8)                                \
    static const matmul NAME##_rows[8] = {NAME##_1, NAME##_2, NAME##_3, NAME##_4,                  \
                                          NAME##_5, NAME##_6, NAME##_7, NAME##_8};                 \
    static void NAME##_dequantize(const uint8_t *w, int64_t row_bytes, const int64_t *ids,         \
                                  int64_t rows, int64_t K, float *out, int threads) {              \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                          \
        for (int64_t r = 0; r < rows; r++)                                                         \
            row_##NAME((sink){NULL, NULL, K, out + r * K}, 0, 1, w + (ids ? ids[r] : r) * row_bytes, 0, K); \
    }
TYPE(q4_0) TYPE(q4_1) TYPE(q5_0) TYPE(q5_1) TYPE(q8_0) TYPE(q4_k) TYPE(q5_k) TYPE(q6_k)

typedef void (*dequantizer)(const uint8_t *, int64_t, const int64_t *, int64_t, int64_t, float *, int);

/* The functions of `type`; 0, or -1 for a type not served, -2 for a K that is not a whole number
 * of blocks, -5 for rows that are not row_bytes long (K / block values blocks of its bytes). */
static int lookup(int type, int64_t K, int64_t row_bytes, const matmul **rows, dequantizer *dequantize) {
    int64_t qk = 32, size = 0;
    switch (type) {
#define CASE(ID, NAME, BLOCK, SIZE)                                                                \
    case ID: *rows = NAME##_rows; *dequantize = NAME##_dequantize; qk = BLOCK; size = SIZE; break;
        CASE(Q4_0, q4_0, 32, 18) CASE(Q4_1, q4_1, 32, 20) CASE(Q5_0, q5_0, 32, 22) CASE(Q5_1, q5_1, 32, 24)
        CASE(Q8_0, q8_0, 32, 34) CASE(Q4_K, q4_k, 256, 144) CASE(Q5_K, q5_k, 256, 176) CASE(Q6_K, q6_k, 256, 210)
#undef CASE
        default: return -1;
    }
    if (K <= 0 || K % qk) return -2;
    return row_bytes == K / qk * size ? 0 : -5;
}

/* w: [N, row_bytes] blocks; x: [M, K] float32; bias: [N] float32 or NULL; out: [M, N], float32
 * (bf16 = 0) or bfloat16 (bf16 = 1). Returns 0, a status of `lookup`, or -3 for M outside 1..8. */
int gguf_mul_mat(const void *w, int64_t row_bytes, int type, const float *x, const float *bias, void *out,
                 int bf16, int64_t M, int64_t N, int64_t K, int threads) {
    const matmul *rows;
    dequantizer unused;
    const int status = lookup(type, K, row_bytes, &rows, &unused);
    if (status) return status;
    if (M < 1 || M > 8) return -3;
    rows[M - 1]((const uint8_t *)w, row_bytes, x, bias, out, bf16, N, K, threads < 1 ? 1 : threads);
    return 0;
}

/* out[r] = the float32 values of row ids[r] of w (of row r where ids is NULL), for r < rows;
 * N: the rows w has. Returns as gguf_mul_mat does, and -4 for an id outside 0..N-1. */
int gguf_dequantize(const void *w, int64_t row_bytes, int type, const int64_t *ids, int64_t rows, int64_t N,
                    int64_t K, float *out, int threads) {
    const matmul *unused;
    dequantizer dequantize;
    const int status = lookup(type, K, row_bytes, &unused, &dequantize);
    if (status) return status;
    for (int64_t r = 0; ids && r < rows; r++)
        if (ids[r] < 0 || ids[r] >= N) return -4;
    if (!ids && rows > N) return -4;
    dequantize((const uint8_t *)w, row_bytes, ids, rows, K, out, threads < 1 ? 1 : threads);
    return 0;
}
