/* Products with GGUF (ggml) quantised weights, read in their packed blocks, on AVX2 + FMA.
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
 * Built on first use by kernelhub/backends/gguf_quant.py with the system C compiler.
 */
#include <immintrin.h>
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

/* Where 32 consecutive weights go. Matrix products (dst NULL) multiply them by M input rows at
 * column k and add into acc (M rows of A accumulators: several independent sums per row keep both
 * FMA units busy when there are few rows); dequantisation (dst set) stores them at dst + k. */
typedef struct {
    __m256 *acc;
    const float *x;
    int64_t K;
    float *dst;
} sink;

/* q[g]: values 8g..8g+7 as int32. Values 0..15 become s0 * q + o0, values 16..31 s1 * q + o1. */
AI void eat(sink t, const int M, const int A, int64_t k, const __m256i *q, __m256 s0, __m256 o0, __m256 s1,
            __m256 o1) {
    __m256 w[4];
    for (int g = 0; g < 4; g++) w[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[g]), g < 2 ? s0 : s1, g < 2 ? o0 : o1);
    if (t.dst) {
        for (int g = 0; g < 4; g++) _mm256_storeu_ps(t.dst + k + 8 * g, w[g]);
        return;
    }
    for (int g = 0; g < 4; g++)
        for (int m = 0; m < M; m++)
            t.acc[m * A + g % A] = _mm256_fmadd_ps(w[g], _mm256_loadu_ps(t.x + m * t.K + k + 8 * g),
                                                   t.acc[m * A + g % A]);
}

/* 32 signed bytes at p -> 4 x 8 int32, widened straight from memory (no shuffles) */
AI void widen(const void *p, __m256i *q) {
    for (int g = 0; g < 4; g++)
        q[g] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)p + 8 * g)));
}

/* 32 values in the bytes of a register (each below 64), split into four and widened (measured a
 * little faster than storing them and widening from memory, the store buffer forwarding them) */
AI void eat_bytes(sink t, const int M, const int A, int64_t k, __m256i bytes, __m256 s0, __m256 o0, __m256 s1,
                  __m256 o1) {
    const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    __m256i q[4] = {_mm256_cvtepi8_epi32(lo), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)),
                    _mm256_cvtepi8_epi32(hi), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi))};
    eat(t, M, A, k, q, s0, o0, s1, o1);
}

/* 8 x groups bytes of nibbles at p, each byte widened to an int32 lane straight from memory and split
 * there (fewer instructions than splitting bytes and widening both halves): low[g] holds the low
 * nibbles of bytes 8g..8g+7, high[g] their high nibbles. */
AI void nibbles(const uint8_t *p, int groups, __m256i *low, __m256i *high) {
    for (int g = 0; g < groups; g++) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * g)));
        low[g] = _mm256_and_si256(v, _mm256_set1_epi32(0x0F));
        high[g] = _mm256_srli_epi32(v, 4);
    }
}

#define NIBBLES256 _mm256_set1_epi8(0x0F)

/* 32 bits -> 32 bytes, 0xFF where the bit is set (bit i -> byte i) */
AI __m256i bits_to_bytes(const uint8_t *p) {
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32((int)bits),
        _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    const __m256i others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(others, _mm256_set1_epi64x(-1));
}

/* Q4_0 (18 bytes): d, 16 bytes of nibbles (low: values 0..15, high: 16..31); w = d * (q - 8) */
AI void block_q4_0(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    const __m256 d = half8(b), o = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    __m256i q[4];
    nibbles(b + 2, 2, q, q + 2);
    eat(t, M, A, k, q, d, o, d, o);
}

/* Q4_1 (20 bytes): d, m, nibbles; w = d * q + m */
AI void block_q4_1(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    const __m256 d = half8(b), m = half8(b + 2);
    __m256i q[4];
    nibbles(b + 4, 2, q, q + 2);
    eat(t, M, A, k, q, d, m, d, m);
}

/* Q5_0 / Q5_1's values in bytes: nibbles as Q4's, and bit i of the 32-bit qh is bit 4 of value i */
AI __m256i fives(const uint8_t *qh, const uint8_t *qs) {
    const __m128i q = _mm_loadu_si128((const __m128i *)qs);
    const __m256i low = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), NIBBLES256);
    return _mm256_or_si256(low, _mm256_and_si256(bits_to_bytes(qh), _mm256_set1_epi8(0x10)));
}

/* Q5_0 (22 bytes): d, qh, nibbles; w = d * (q - 16) */
AI void block_q5_0(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    const __m256 d = half8(b), o = _mm256_mul_ps(d, _mm256_set1_ps(-16.0f));
    eat_bytes(t, M, A, k, fives(b + 2, b + 6), d, o, d, o);
}

/* Q5_1 (24 bytes): d, m, qh, nibbles; w = d * q + m */
AI void block_q5_1(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    const __m256 d = half8(b), m = half8(b + 2);
    eat_bytes(t, M, A, k, fives(b + 4, b + 8), d, m, d, m);
}

/* Q8_0 (34 bytes): d, 32 signed bytes; w = d * q */
AI void block_q8_0(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    const __m256 d = half8(b), zero = _mm256_setzero_ps();
    __m256i q[4];
    widen(b + 2, q);
    eat(t, M, A, k, q, d, zero, d, zero);
}

/* The eight 6-bit scales and minimums of Q4_K / Q5_K, packed in 12 bytes (ggml's get_scale_min_k4,
 * unpacked four at a time in 32-bit words as ggml's AVX2 code does): the values of sub-block j (32
 * values) are d * scale[j] * q - dmin * min[j]. Kept in memory, from where they are broadcast. */
AI void k_scales(const uint8_t *b, float *scale, float *offset) {
    uint32_t u[4];
    memcpy(u, b + 4, 12);
    const uint32_t six = 0x3f3f3f3f, four = 0x0f0f0f0f, two = 0x03030303;
    u[3] = ((u[2] >> 4) & four) | (((u[1] >> 6) & two) << 4); /* min[4..7] */
    const uint32_t min_low = u[1] & six;                        /* min[0..3] */
    u[1] = (u[2] & four) | (((u[0] >> 6) & two) << 4);          /* scale[4..7] */
    u[2] = min_low;
    u[0] &= six;                                                /* scale[0..3] */
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)u)));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(u + 2))));
    _mm256_storeu_ps(scale, _mm256_mul_ps(half8(b), sc));
    _mm256_storeu_ps(offset, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(half8(b + 2), mn)));
}

/* Q4_K (144 bytes): d, dmin, scales, 128 bytes of nibbles: bytes 32c..32c+31 hold sub-block 2c in
 * their low nibbles and 2c+1 in their high ones. */
AI void block_q4_k(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    float scale[8], offset[8];
    k_scales(b, scale, offset);
    for (int c = 0; c < 4; c++) {
        __m256i low[4], high[4];
        nibbles(b + 16 + 32 * c, 4, low, high);
        const __m256 s0 = _mm256_broadcast_ss(scale + 2 * c), o0 = _mm256_broadcast_ss(offset + 2 * c);
        const __m256 s1 = _mm256_broadcast_ss(scale + 2 * c + 1), o1 = _mm256_broadcast_ss(offset + 2 * c + 1);
        eat(t, M, A, k + 64 * c, low, s0, o0, s0, o0);
        eat(t, M, A, k + 64 * c + 32, high, s1, o1, s1, o1);
    }
}

/* Q5_K (176 bytes): as Q4_K, with 32 bytes qh before the nibbles: bit j of qh[l] is bit 4 of value
 * l of sub-block j. */
AI void block_q5_k(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    float scale[8], offset[8];
    k_scales(b, scale, offset);
    __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    for (int c = 0; c < 4; c++) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * c));
        /* 16-bit shifts: the bit that lands on bit 4 of a byte comes from the same byte */
        const __m256i h0 = _mm256_and_si256(_mm256_slli_epi16(qh, 4), bit4);
        const __m256i h1 = _mm256_and_si256(_mm256_slli_epi16(qh, 3), bit4);
        qh = _mm256_srli_epi16(qh, 2);
        const __m256 s0 = _mm256_broadcast_ss(scale + 2 * c), o0 = _mm256_broadcast_ss(offset + 2 * c);
        const __m256 s1 = _mm256_broadcast_ss(scale + 2 * c + 1), o1 = _mm256_broadcast_ss(offset + 2 * c + 1);
        eat_bytes(t, M, A, k + 64 * c, _mm256_or_si256(_mm256_and_si256(q, NIBBLES256), h0), s0, o0, s0, o0);
        eat_bytes(t, M, A, k + 64 * c + 32,
                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), NIBBLES256), h1), s1, o1, s1, o1);
    }
}

/* Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit high parts, 16 signed 8-bit scales (one
 * per 16 values), d. Each half of 128 values: sub-block j (32 values) takes its low four bits from
 * ql[32 * (j % 2) + l] (low nibble for j < 2, high for j >= 2) and bits 4-5 from qh[l] >> 2j;
 * w = d * scale * (q - 32). */
AI void block_q6_k(sink t, const int M, const int A, int64_t k, const uint8_t *b) {
    float scale[16], offset[16];
    for (int i = 0; i < 2; i++) {
        const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 192 + 8 * i))));
        const __m256 f = _mm256_mul_ps(half8(b + 208), sc);
        _mm256_storeu_ps(scale + 8 * i, f);
        _mm256_storeu_ps(offset + 8 * i, _mm256_mul_ps(f, _mm256_set1_ps(-32.0f)));
    }
    const __m256i bits45 = _mm256_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * h));
        const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        for (int j = 0; j < 4; j++) {
            const __m256i ql = j % 2 ? ql1 : ql0;
            const __m256i low = _mm256_and_si256(j < 2 ? ql : _mm256_srli_epi16(ql, 4), NIBBLES256);
            const __m256i q = _mm256_or_si256(low, _mm256_and_si256(_mm256_slli_epi16(qh, 4), bits45));
            qh = _mm256_srli_epi16(qh, 2);
            const int i = 8 * h + 2 * j;
            eat_bytes(t, M, A, k + 128 * h + 32 * j, q, _mm256_broadcast_ss(scale + i), _mm256_broadcast_ss(offset + i),
                      _mm256_broadcast_ss(scale + i + 1), _mm256_broadcast_ss(offset + i + 1));
        }
    }
}

/* The blocks of one row that hold values k0..k1 (multiples of the block size), into t. Each block
 * asks for the cache lines PREFETCH bytes ahead: a core streaming one row at a time keeps too few
 * reads in flight on the hardware prefetcher alone (measured: about 1.3x faster at one input row,
 * with 4 KB ahead against 2 KB or none). Past a row's end it fetches the next row, which is read
 * next; a prefetch never faults. */
#define PREFETCH 4096
#define ROW(NAME, QK, SIZE)                                                                       \
    AI void row_##NAME(sink t, const int M, const int A, const uint8_t *row, int64_t k0, int64_t k1) { \
        for (int64_t i = k0 / QK; i < k1 / QK; i++) {                                             \
            for (int line = 0; line < (SIZE + 63) / 64; line++)                                   \
                _mm_prefetch((const char *)row + i * SIZE + PREFETCH + 64 * line, _MM_HINT_T0);   \
            block_##NAME(t, M, A, i * QK, row + i * SIZE);                                        \
        }                                                                                         \
    }
ROW(q4_0, 32, 18) ROW(q4_1, 32, 20) ROW(q5_0, 32, 22) ROW(q5_1, 32, 24) ROW(q8_0, 32, 34)
ROW(q4_k, 256, 144) ROW(q5_k, 256, 176) ROW(q6_k, 256, 210)

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

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

/* One function per type and row count M, so the accumulators live in registers: 4 independent
 * sums per row for 1 or 2 rows, 2 for 3 or 4, 1 from 5 rows on (16 ymm registers in all). */
#define MATMUL(NAME, M)                                                                           \
    static void NAME##_##M(const uint8_t *w, int64_t row_bytes, const float *x, const float *bias, \
                           void *out, int bf16, int64_t N, int64_t K, int threads) {              \
        enum { A = M <= 2 ? 4 : M <= 4 ? 2 : 1 };                                                 \
        const int64_t cols = span(M, K), group = cols < K ? GROUP : 1;                            \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        for (int64_t n0 = 0; n0 < N; n0 += group) {                                               \
            const int64_t n1 = n0 + group < N ? n0 + group : N;                                   \
            __m256 kept[GROUP][M * A];                                                            \
            for (int64_t k0 = 0; k0 < K; k0 += cols) {                                            \
                const int64_t k1 = k0 + cols < K ? k0 + cols : K;                                 \
                for (int64_t n = n0; n < n1; n++) {                                               \
                    __m256 acc[M * A];                                                            \
                    for (int i = 0; i < M * A; i++) acc[i] = k0 ? kept[n - n0][i] : _mm256_setzero_ps(); \
                    row_##NAME((sink){acc, x, K, NULL}, M, A, w + n * row_bytes, k0, k1);         \
                    if (k1 < K) {                                                                 \
                        for (int i = 0; i < M * A; i++) kept[n - n0][i] = acc[i];                 \
                        continue;                                                                 \
                    }                                                                             \
                    for (int m = 0; m < M; m++) {                                                 \
                        for (int a = 1; a < A; a++) acc[m * A] = _mm256_add_ps(acc[m * A], acc[m * A + a]); \
                        const float s = hsum(acc[m * A]) + (bias ? bias[n] : 0.0f);               \
                        if (bf16) ((uint16_t *)out)[m * N + n] = to_bf16(s);                       \
                        else ((float *)out)[m * N + n] = s;                                       \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
    }

#define TYPE(NAME)                                                                                \
    MATMUL(NAME, 1) MATMUL(NAME, 2) MATMUL(NAME, 3) MATMUL(NAME, 4)                               \
    MATMUL(NAME, 5) MATMUL(NAME, 6) MATMUL(NAME, 7) MATMUL(NAME, 8)                               \
    static const matmul NAME##_rows[8] = {NAME##_1, NAME##_2, NAME##_3, NAME##_4,                 \
                                          NAME##_5, NAME##_6, NAME##_7, NAME##_8};                \
    static void NAME##_dequantize(const uint8_t *w, int64_t row_bytes, const int64_t *ids,        \
                                  int64_t rows, int64_t K, float *out, int threads) {             \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                         \
        for (int64_t r = 0; r < rows; r++)                                                        \
            row_##NAME((sink){NULL, NULL, K, out + r * K}, 0, 1, w + (ids ? ids[r] : r) * row_bytes, 0, K); \
    }
TYPE(q4_0) TYPE(q4_1) TYPE(q5_0) TYPE(q5_1) TYPE(q8_0) TYPE(q4_k) TYPE(q5_k) TYPE(q6_k)

typedef void (*dequantizer)(const uint8_t *, int64_t, const int64_t *, int64_t, int64_t, float *, int);

static int lookup(int type, int64_t K, const matmul **rows, dequantizer *dequantize) {
    int64_t qk = 32;
    switch (type) {
#define CASE(ID, NAME, BLOCK) \
    case ID: *rows = NAME##_rows; *dequantize = NAME##_dequantize; qk = BLOCK; break;
        CASE(Q4_0, q4_0, 32) CASE(Q4_1, q4_1, 32) CASE(Q5_0, q5_0, 32) CASE(Q5_1, q5_1, 32)
        CASE(Q8_0, q8_0, 32) CASE(Q4_K, q4_k, 256) CASE(Q5_K, q5_k, 256) CASE(Q6_K, q6_k, 256)
#undef CASE
        default: return -1;
    }
    return K > 0 && K % qk == 0 ? 0 : -2;
}

/* w: [N, row_bytes] blocks; x: [M, K] float32; bias: [N] float32 or NULL; out: [M, N], float32
 * (bf16 = 0) or bfloat16 (bf16 = 1). Returns 0, -1 for a type it does not serve, -2 for a K that
 * is not a whole number of blocks, -3 for M outside 1..8. The caller checks row_bytes. */
int gguf_mul_mat(const void *w, int64_t row_bytes, int type, const float *x, const float *bias, void *out,
                 int bf16, int64_t M, int64_t N, int64_t K, int threads) {
    const matmul *rows;
    dequantizer unused;
    const int status = lookup(type, K, &rows, &unused);
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
    const int status = lookup(type, K, &unused, &dequantize);
    if (status) return status;
    for (int64_t r = 0; ids && r < rows; r++)
        if (ids[r] < 0 || ids[r] >= N) return -4;
    if (!ids && rows > N) return -4;
    dequantize((const uint8_t *)w, row_bytes, ids, rows, K, out, threads < 1 ? 1 : threads);
    return 0;
}
