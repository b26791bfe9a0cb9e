/* Unpacking GGUF blocks on AVX2: 32 values at a time as four registers of 8 int32, handed to
 * `eat` (gguf_quant.c) with their scales. Included by gguf_quant.c when it is built without AVX-512. */

/* 32 signed bytes at p -> 4 x 8 int32, widened straight from memory (no shuffles) */
AI void widen(const void *p, __m256i *q) {
    for (int g = 0; g < 4; g++)
        q[g] = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)p + 8 * g)));
}

/* 32 values in the bytes of a register (each below 64), split into four and widened (measured a
 * little faster than storing them and widening from memory, the store buffer forwarding them) */
AI void eat_bytes(sink t, const int M, const int A, const int P, int64_t k, __m256i bytes, __m256 s0, __m256 o0,
                  __m256 s1, __m256 o1) {
    const __m128i lo = _mm256_castsi256_si128(bytes), hi = _mm256_extracti128_si256(bytes, 1);
    __m256i q[4] = {_mm256_cvtepi8_epi32(lo), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)),
                    _mm256_cvtepi8_epi32(hi), _mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi))};
    eat(t, M, A, P, k, q, s0, o0, s1, o1);
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

/* Q4_0 (18 bytes): d, 16 bytes of nibbles (low: values 0..15, high: 16..31); w = d * (q - 8) */
AI void block_q4_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m256 d = half_v(b), o = _mm256_mul_ps(d, _mm256_set1_ps(-8.0f));
    __m256i q[4];
    nibbles(b + 2, 2, q, q + 2);
    eat(t, M, A, P, k, q, d, o, d, o);
}

/* Q4_1 (20 bytes): d, m, nibbles; w = d * q + m */
AI void block_q4_1(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m256 d = half_v(b), m = half_v(b + 2);
    __m256i q[4];
    nibbles(b + 4, 2, q, q + 2);
    eat(t, M, A, P, k, q, d, m, d, m);
}

/* FIVE[b]: bit 4 of eight values, as int32 lanes, from one byte b of a Q5 block's qh (16 where bit i
 * of b is set, else 0). 8 KB, filled when the library is loaded. */
static int32_t FIVE[256][8] __attribute__((aligned(32)));
__attribute__((constructor)) static void fill_five(void) {
    for (int b = 0; b < 256; b++)
        for (int i = 0; i < 8; i++) FIVE[b][i] = (b >> i & 1) << 4;
}

/* Q5_0 / Q5_1's values: Q4's nibbles (int32 lanes, split where they are widened), each register of 8
 * or-ed with its bits 4 read from FIVE (a load the or takes as its operand), so the vector ports run
 * one op where spreading the bits with a byte shuffle and widening bytes from a register ran about
 * ten, mostly on the two shuffle ports (measured on a 2-core AMD EPYC, Zen 3, blocks in L3: 1.5
 * against 2.25 ns per 32 values; testing each lane's bit with a mask and a min: 1.9). */
AI void fives(const uint8_t *qh, const uint8_t *qs, __m256i *q) {
    nibbles(qs, 2, q, q + 2);
    for (int g = 0; g < 4; g++) q[g] = _mm256_or_si256(q[g], _mm256_load_si256((const __m256i *)FIVE[qh[g]]));
}

/* Q5_0 (22 bytes): d, qh, nibbles; w = d * (q - 16) */
AI void block_q5_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m256 d = half_v(b), o = _mm256_mul_ps(d, _mm256_set1_ps(-16.0f));
    __m256i q[4];
    fives(b + 2, b + 6, q);
    eat(t, M, A, P, k, q, d, o, d, o);
}

/* Q5_1 (24 bytes): d, m, qh, nibbles; w = d * q + m */
AI void block_q5_1(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m256 d = half_v(b), m = half_v(b + 2);
    __m256i q[4];
    fives(b + 4, b + 8, q);
    eat(t, M, A, P, k, q, d, m, d, m);
}

/* Q8_0 (34 bytes): d, 32 signed bytes; w = d * q */
AI void block_q8_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m256 d = half_v(b), zero = _mm256_setzero_ps();
    __m256i q[4];
    widen(b + 2, q);
    eat(t, M, A, P, k, q, d, zero, d, zero);
}

/* Q4_K (144 bytes): d, dmin, scales, 128 bytes of nibbles: bytes 32c..32c+31 hold sub-block 2c in
 * their low nibbles and 2c+1 in their high ones. */
AI void block_q4_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    float scale[8], offset[8];
    k_scales(b, scale, offset);
    for (int c = 0; c < 4; c++) {
        __m256i low[4], high[4];
        nibbles(b + 16 + 32 * c, 4, low, high);
        const __m256 s0 = _mm256_broadcast_ss(scale + 2 * c), o0 = _mm256_broadcast_ss(offset + 2 * c);
        const __m256 s1 = _mm256_broadcast_ss(scale + 2 * c + 1), o1 = _mm256_broadcast_ss(offset + 2 * c + 1);
        eat(t, M, A, 0, k + 64 * c, low, s0, o0, s0, o0);
        eat(t, M, A, GROUPS, k + 64 * c + 32, high, s1, o1, s1, o1);
    }
}

/* Q5_K (176 bytes): as Q4_K, with 32 bytes qh before the nibbles: bit j of qh[l] is bit 4 of value
 * l of sub-block j. */
AI void block_q5_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
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
        eat_bytes(t, M, A, 0, k + 64 * c, _mm256_or_si256(_mm256_and_si256(q, NIBBLES256), h0), s0, o0, s0, o0);
        eat_bytes(t, M, A, GROUPS, k + 64 * c + 32,
                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), NIBBLES256), h1), s1, o1, s1, o1);
    }
}

/* Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit high parts, 16 signed 8-bit scales (one
 * per 16 values), d. Each half of 128 values: sub-block j (32 values) takes its low four bits from
 * ql[32 * (j % 2) + l] (low nibble for j < 2, high for j >= 2) and bits 4-5 from qh[l] >> 2j;
 * w = d * scale * (q - 32). */
AI void block_q6_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    float scale[16], offset[16];
    q6_scales(b, scale, offset);
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
            eat_bytes(t, M, A, (j % 2) * GROUPS, k + 128 * h + 32 * j, q, _mm256_broadcast_ss(scale + i),
                      _mm256_broadcast_ss(offset + i), _mm256_broadcast_ss(scale + i + 1),
                      _mm256_broadcast_ss(offset + i + 1));
        }
    }
}
