/* Unpacking GGUF blocks on AVX-512 (F, BW, VL): 32 values at a time as two registers of 16.
 *
 * Types of 4 and 5 bits look their weights up: the 16 (or 32) weights a block's scale and offset
 * can give, d * i + m for every integer i, fill one register (two), computed with the same one
 * rounding as unpacking each value, and each value's bits index it (vpermps, vpermt2ps). That is
 * one permute per 16 weights, on the shuffle port, in place of a conversion and a multiply-add on
 * the port the products need (which, on CPUs with one 512-bit FMA unit, makes 512-bit unpacking no
 * faster than 256-bit). Q8_0 and Q6_K (256 and 64 values) convert and scale, as with AVX2 (`eat`).
 * Included by gguf_quant.c when it is built with AVX-512. */

/* The two halves at p (a block's d and m) broadcast, read in one load */
AI void half_pair(const uint8_t *p, __m512 *d, __m512 *m) {
    uint32_t both;
    memcpy(&both, p, 4);
    *d = _mm512_set1_ps(HALF[both & 0xFFFF]);
    *m = _mm512_set1_ps(HALF[both >> 16]);
}

/* 16 bytes at p, each widened to an int32 lane, unsigned or signed */
AI __m512i u8x16(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
AI __m512i i8x16(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }

/* the low and the high nibble of each widened byte */
AI __m512i low4(__m512i v) { return _mm512_and_si512(v, _mm512_set1_epi32(0x0F)); }
AI __m512i high4(__m512i v) { return _mm512_srli_epi32(v, 4); }

/* v with 16 added in the lanes `bits` names: bit 4 of a Q5 value */
AI __m512i with_bit4(__m512i v, __mmask16 bits) { return _mm512_mask_or_epi32(v, bits, v, _mm512_set1_epi32(0x10)); }

/* The weights integers 0..15 (`from` 0) or 16..31 (`from` 16) give: s * i + o */
static const float COUNT[32] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
AI __m512 table(__m512 s, __m512 o, int from) { return _mm512_fmadd_ps(_mm512_loadu_ps(COUNT + from), s, o); }

/* 32 weights of 4 bits: the low 4 bits of each lane of q[g] index `weights` */
AI void look_up4(sink t, const int M, const int A, const int P, int64_t k, const __m512i *q, __m512 weights) {
    const __m512 w[2] = {_mm512_permutexvar_ps(q[0], weights), _mm512_permutexvar_ps(q[1], weights)};
    take(t, M, A, P, k, w);
}

/* 32 weights of 5 bits (each lane of q[g] below 32) from the tables of 0..15 and of 16..31 */
AI void look_up5(sink t, const int M, const int A, const int P, int64_t k, const __m512i *q, __m512 s, __m512 o) {
    const __m512 low = table(s, o, 0), high = table(s, o, 16);
    const __m512 w[2] = {_mm512_permutex2var_ps(low, q[0], high), _mm512_permutex2var_ps(low, q[1], high)};
    take(t, M, A, P, k, w);
}

/* Q4_0 (18 bytes): d, 16 bytes of nibbles (low: values 0..15, high: 16..31); w = d * (q - 8) */
AI void block_q4_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m512 d = half_v(b), o = _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
    const __m512i v = u8x16(b + 2), q[2] = {v, high4(v)};
    look_up4(t, M, A, P, k, q, table(d, o, 0));
}

/* Q4_1 (20 bytes): d, m, nibbles; w = d * q + m */
AI void block_q4_1(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    __m512 d, m;
    half_pair(b, &d, &m);
    const __m512i v = u8x16(b + 4), q[2] = {v, high4(v)};
    look_up4(t, M, A, P, k, q, table(d, m, 0));
}

/* Q5_0 / Q5_1's values: nibbles as Q4's, and bit i of the 32-bit qh is bit 4 of value i */
AI void fives(const uint8_t *qh, const uint8_t *qs, __m512i *q) {
    uint32_t bits;
    memcpy(&bits, qh, 4);
    const __m512i v = u8x16(qs);
    q[0] = with_bit4(low4(v), (__mmask16)bits);
    q[1] = with_bit4(high4(v), (__mmask16)(bits >> 16));
}

/* Q5_0 (22 bytes): d, qh, nibbles; w = d * (q - 16) */
AI void block_q5_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m512 d = half_v(b), o = _mm512_mul_ps(d, _mm512_set1_ps(-16.0f));
    __m512i q[2];
    fives(b + 2, b + 6, q);
    look_up5(t, M, A, P, k, q, d, o);
}

/* Q5_1 (24 bytes): d, m, qh, nibbles; w = d * q + m */
AI void block_q5_1(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    __m512 d, m;
    half_pair(b, &d, &m);
    __m512i q[2];
    fives(b + 4, b + 8, q);
    look_up5(t, M, A, P, k, q, d, m);
}

/* Q8_0 (34 bytes): d, 32 signed bytes; w = d * q */
AI void block_q8_0(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    const __m512 d = half_v(b), zero = _mm512_setzero_ps();
    const __m512i q[2] = {i8x16(b + 2), i8x16(b + 18)};
    eat(t, M, A, P, k, q, d, zero, d, zero);
}

/* Q4_K (144 bytes): d, dmin, scales, 128 bytes of nibbles: bytes 32c..32c+31 hold sub-block 2c in
 * their low nibbles and 2c+1 in their high ones. */
AI void block_q4_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    float scale[8], offset[8];
    k_scales(b, scale, offset);
    for (int c = 0; c < 4; c++) {
        const __m512i v0 = u8x16(b + 16 + 32 * c), v1 = u8x16(b + 32 + 32 * c);
        const __m512i low[2] = {v0, v1}, high[2] = {high4(v0), high4(v1)};
        look_up4(t, M, A, 0, k + 64 * c, low,
                 table(_mm512_set1_ps(scale[2 * c]), _mm512_set1_ps(offset[2 * c]), 0));
        look_up4(t, M, A, GROUPS, k + 64 * c + 32, high,
                 table(_mm512_set1_ps(scale[2 * c + 1]), _mm512_set1_ps(offset[2 * c + 1]), 0));
    }
}

/* Q5_K (176 bytes): as Q4_K, with 32 bytes qh before the nibbles: bit j of qh[l] is bit 4 of value
 * l of sub-block j. */
AI void block_q5_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    float scale[8], offset[8];
    k_scales(b, scale, offset);
    const __m128i qh0 = _mm_loadu_si128((const __m128i *)(b + 16)), qh1 = _mm_loadu_si128((const __m128i *)(b + 32));
    for (int c = 0; c < 4; c++) {
        const __m512i v0 = u8x16(b + 48 + 32 * c), v1 = u8x16(b + 64 + 32 * c);
        const __m128i bit0 = _mm_set1_epi8((char)(1 << (2 * c))), bit1 = _mm_set1_epi8((char)(2 << (2 * c)));
        const __m512i low[2] = {with_bit4(low4(v0), _mm_test_epi8_mask(qh0, bit0)),
                                with_bit4(low4(v1), _mm_test_epi8_mask(qh1, bit0))};
        const __m512i high[2] = {with_bit4(high4(v0), _mm_test_epi8_mask(qh0, bit1)),
                                 with_bit4(high4(v1), _mm_test_epi8_mask(qh1, bit1))};
        look_up5(t, M, A, 0, k + 64 * c, low, _mm512_set1_ps(scale[2 * c]), _mm512_set1_ps(offset[2 * c]));
        look_up5(t, M, A, GROUPS, k + 64 * c + 32, high, _mm512_set1_ps(scale[2 * c + 1]),
                 _mm512_set1_ps(offset[2 * c + 1]));
    }
}

/* Q6_K (210 bytes): 128 bytes of low nibbles, 64 of 2-bit high parts, 16 signed 8-bit scales (one
 * per 16 values), d. Each half of 128 values: sub-block j (32 values) takes its low four bits from
 * ql[32 * (j % 2) + l] (low nibble for j < 2, high for j >= 2) and bits 4-5 from qh[l] >> 2j;
 * w = d * scale * (q - 32). */
AI void block_q6_k(sink t, const int M, const int A, const int P, int64_t k, const uint8_t *b) {
    float scale[16], offset[16];
    q6_scales(b, scale, offset);
    for (int h = 0; h < 2; h++) {
        __m512i qh[2] = {u8x16(b + 128 + 32 * h), u8x16(b + 144 + 32 * h)};
        for (int j = 0; j < 4; j++) {
            __m512i q[2];
            for (int g = 0; g < 2; g++) {
                const __m512i v = u8x16(b + 64 * h + 32 * (j % 2) + 16 * g);
                const __m512i bits45 = _mm512_and_si512(_mm512_slli_epi32(qh[g], 4), _mm512_set1_epi32(0x30));
                q[g] = _mm512_or_si512(j < 2 ? low4(v) : high4(v), bits45);
                qh[g] = _mm512_srli_epi32(qh[g], 2);
            }
            const int i = 8 * h + 2 * j;
            eat(t, M, A, (j % 2) * GROUPS, k + 128 * h + 32 * j, q, _mm512_set1_ps(scale[i]),
                _mm512_set1_ps(offset[i]), _mm512_set1_ps(scale[i + 1]), _mm512_set1_ps(offset[i + 1]));
        }
    }
}
