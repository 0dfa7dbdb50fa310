/* One decode step (one token, batch 1) of a Llama-family model whose decoder linears are 4-bit,
 * on the CPU, in one call: qingzhou/llm/quantized/native.py compiles this file with the system C
 * compiler at first use and calls it through ctypes. Why C: at batch 1 a 135M-parameter 4-bit
 * model's token is ~5 ms of int4 kernels and ~8 ms of per-op dispatch when driven op by op from
 * Python; here the whole step is one call, one OpenMP team with barriers between the stages.
 *
 * Arithmetic (as llama.cpp's Q4_1 x Q8_1 dot products): every matrix-vector product quantises its
 * input vector to int8 in blocks of 32 (one fp32 scale per block, round to nearest), multiplies it
 * with the 4-bit codes in integer arithmetic (AVX2 `maddubs`: unsigned 4-bit code x signed 8-bit
 * activation, exact int32 sums per block) and applies the scales in fp32:
 *     sum_i w_i x_i = sum_b d_b * s_g(b) * sum_{i in b} q_i a_i  -  sum_g m_g * sum_{b in g} d_b sum_{i in b} a_i
 * with w = s*q - m (m = s*zero) per group of g (a multiple of 32) and x_i ~ d_b a_i. Norms, rotary
 * embedding, attention, SiLU and residuals are fp32. The head is int8 (symmetric, per 32 block).
 *
 * Layouts (made by native.py): a 4-bit matrix is [rows][K/2] bytes, each 32-code block as 16 bytes
 * with code j in the low nibble and code j+16 in the high nibble of byte j; scales s and offsets m
 * are fp32 [rows][K/g]. The head is int8 [rows][K] plus fp32 [rows][K/32]. The KV cache is the
 * caller's fp32 [layers][kv_heads][max_len][head_dim] pair (the Python prefill fills the same one).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QZ_AVX2 1
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32

typedef struct {
    const uint8_t *q;    /* [rows][k/2] */
    const float *s, *m;  /* [rows][k/g] */
    const float *bias;   /* [rows] or NULL */
    int rows, k, g;
} q4mat;

typedef struct {
    const float *norm1, *norm2;
    q4mat q, k, v, o, gate, up, down;
    /* act-order layers: the input-column order of the codes (x is gathered by it before being
     * quantised) for the q/k/v, o, gate/up and down inputs; NULL where the columns are in order */
    const int32_t *perm[4];
} layer_t;

typedef struct {
    int n_layers, hidden, heads, kv_heads, head_dim, inter, vocab, score_cap;
    float eps, scale;
    const float *embed;       /* [vocab][hidden] fp32 */
    const float *final_norm;  /* [hidden] */
    const int8_t *head_q;     /* [vocab][hidden] */
    const float *head_d;      /* [vocab][hidden/32] */
    const float *head_bias;   /* [vocab] or NULL */
    layer_t *layers;
    /* scratch */
    float *x, *xn, *xp, *qkv, *att, *tmp, *gu, *scores, *ad, *gs;
    int8_t *aq;
} model_t;

int qz_abi(void) { return 2; }

/* 1 where the dot products are vectorised (AVX2); the plain C loops are ~7x slower than that and
 * slower than torch's int4 kernel, so native.py only uses such a build in tests. */
int qz_simd(void) {
#ifdef QZ_AVX2
    return 1;
#else
    return 0;
#endif
}

void qz_free(void *mp);

void *qz_create(int n_layers, int hidden, int heads, int kv_heads, int head_dim, int inter, int vocab,
                float eps, const float *embed, const float *final_norm, const int8_t *head_q,
                const float *head_d, const float *head_bias) {
    model_t *m = calloc(1, sizeof(model_t));
    if (!m) return NULL;
    m->n_layers = n_layers; m->hidden = hidden; m->heads = heads; m->kv_heads = kv_heads;
    m->head_dim = head_dim; m->inter = inter; m->vocab = vocab; m->eps = eps;
    m->scale = 1.0f / sqrtf((float)head_dim);
    m->embed = embed; m->final_norm = final_norm; m->head_q = head_q; m->head_d = head_d;
    m->head_bias = head_bias;
    m->layers = calloc((size_t)n_layers, sizeof(layer_t));
    int widest = hidden > inter ? hidden : inter;  /* the longest vector a matrix reads */
    if (heads * head_dim > widest) widest = heads * head_dim;
    int qkv = (heads + 2 * kv_heads) * head_dim;
    if (qkv < widest) qkv = widest;
    m->x = calloc((size_t)hidden, sizeof(float));
    m->xn = calloc((size_t)widest, sizeof(float));
    m->xp = calloc((size_t)widest, sizeof(float));
    m->qkv = calloc((size_t)qkv, sizeof(float));
    m->att = calloc((size_t)heads * head_dim, sizeof(float));
    m->tmp = calloc((size_t)hidden, sizeof(float));
    m->gu = calloc((size_t)2 * inter, sizeof(float));
    m->ad = calloc((size_t)widest / QK + 1, sizeof(float) * 2);
    m->gs = calloc((size_t)widest / QK + 1, sizeof(float));
    m->aq = calloc((size_t)widest + QK, 1);
    if (!m->layers || !m->x || !m->xn || !m->xp || !m->qkv || !m->att || !m->tmp || !m->gu || !m->ad || !m->gs || !m->aq) {
        qz_free(m);
        return NULL;
    }
    return m;
}

static q4mat mat(const uint8_t *q, const float *s, const float *m, const float *bias, int rows, int k, int g) {
    q4mat r = {q, s, m, bias, rows, k, g};
    return r;
}

/* mats: 7 matrices in the order q, k, v, o, gate, up, down; each as (codes, s, m, bias, rows, k, g).
 * perms: the 4 input orders (q/k/v, o, gate/up, down), NULL entries where in order. */
void qz_set_layer(void *mp, int i, const float *norm1, const float *norm2, const uint8_t **codes,
                  const float **s, const float **mm, const float **bias, const int *rows, const int *ks,
                  const int *gs, const int32_t **perms) {
    model_t *m = mp;
    layer_t *l = &m->layers[i];
    l->norm1 = norm1; l->norm2 = norm2;
    for (int j = 0; j < 4; j++) l->perm[j] = perms[j];
    q4mat *all[7] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
    for (int j = 0; j < 7; j++) *all[j] = mat(codes[j], s[j], mm[j], bias[j], rows[j], ks[j], gs[j]);
}

void qz_free(void *mp) {
    model_t *m = mp;
    if (!m) return;
    free(m->layers); free(m->x); free(m->xn); free(m->xp); free(m->qkv); free(m->att); free(m->tmp); free(m->gu);
    free(m->scores); free(m->ad); free(m->gs); free(m->aq);
    free(m);
}

/* ---- serial pieces (run by one thread) ---- */

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* Block b of x [n] -> int8 codes in aq, its scale ad[b] and ad[n/32 + b] = d_b * sum(a in b). */
static inline void quantize_block(const float *xb, int b, int n, int8_t *aq, float *ad) {
    float amax = 0.f;
    for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(xb[i]));
    float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; i++) {
        int v = (int)lrintf(xb[i] * id);
        v = v > 127 ? 127 : (v < -127 ? -127 : v);
        aq[b * QK + i] = (int8_t)v;
        sum += v;
    }
    ad[b] = d;
    ad[n / QK + b] = d * (float)sum;
}

static void quantize_q8(const float *x, int n, int8_t *aq, float *ad) {
    for (int b = 0; b < n / QK; b++) quantize_block(x + b * QK, b, n, aq, ad);
}

/* x in the codes' column order: x itself, or gathered into buf by perm */
static const float *ordered(const float *x, const int32_t *perm, int n, float *buf) {
    if (!perm) return x;
    for (int i = 0; i < n; i++) buf[i] = x[perm[i]];
    return buf;
}

/* gs[g] = sum over the blocks of group g of d_b * sum(a): the offsets' share, the same for every row. */
static void group_sums(const float *ad, int n, int g, float *gs) {
    int nb = n / QK, bpg = g / QK;
    for (int gi = 0; gi < n / g; gi++) {
        float t = 0.f;
        for (int j = 0; j < bpg; j++) t += ad[nb + gi * bpg + j];
        gs[gi] = t;
    }
}

/* The input of a stage's matrices: x in their column order, quantised, and its group sums for
 * group size g (serial: run by one thread). */
static void quantize_input(model_t *m, const float *x, const int32_t *perm, int n, int g) {
    quantize_q8(ordered(x, perm, n, m->xp), n, m->aq, m->ad);
    group_sums(m->ad, n, g, m->gs);
}

#ifdef QZ_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#ifdef QZ_AVX2
/* 8 int32 sums of 4 products each: unsigned codes x signed activations (VNNI where the CPU has it) */
static inline __m256i dot_u4s8(__m256i q, __m256i a, __m256i ones) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    (void)ones;
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, a);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(q, a), ones);
#endif
}
#endif

/* one row of a 4-bit matrix against the quantised vector */
static inline float row_q4(const q4mat *w, int r, const int8_t *a, const float *ad, const float *gs) {
    const int k = w->k, g = w->g, ng = k / g, bpg = g / QK;
    const uint8_t *q = w->q + (size_t)r * (k / 2);
    const float *s = w->s + (size_t)r * ng, *mo = w->m + (size_t)r * ng;
    float off = 0.f;
    for (int gi = 0; gi < ng; gi++) off += mo[gi] * gs[gi];
#ifdef QZ_AVX2
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    for (int gi = 0; gi < ng; gi++) {
        __m256 accg = _mm256_setzero_ps();
        for (int j = 0; j < bpg; j++, b++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + (size_t)b * 16));
            __m256i qv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
            __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK));
            accg = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot_u4s8(qv, av, ones)), _mm256_set1_ps(ad[b]), accg);
        }
        acc = _mm256_fmadd_ps(accg, _mm256_set1_ps(s[gi]), acc);
    }
    return hsum8(acc) - off;
#else
    float acc = 0.f;
    int b = 0;
    for (int gi = 0; gi < ng; gi++) {
        float accg = 0.f;
        for (int j = 0; j < bpg; j++, b++) {
            const uint8_t *qb = q + (size_t)b * 16;
            const int8_t *ab = a + (size_t)b * QK;
            int t = 0;
            for (int i = 0; i < 16; i++) t += (qb[i] & 15) * ab[i] + (qb[i] >> 4) * ab[i + 16];
            accg += (float)t * ad[b];
        }
        acc += accg * s[gi];
    }
    return acc - off;
#endif
}

static inline float row_q8(const int8_t *wq, const float *wd, int k, const int8_t *a, const float *ad) {
    const int nb = k / QK;
#ifdef QZ_AVX2
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wv = _mm256_loadu_si256((const __m256i *)(wq + (size_t)b * QK));
        __m256i av = _mm256_loadu_si256((const __m256i *)(a + (size_t)b * QK));
        __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(av, wv)), ones);
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(wd[b] * ad[b]), acc);
    }
    return hsum8(acc);
#else
    float acc = 0.f;
    for (int b = 0; b < nb; b++) {
        int t = 0;
        for (int i = 0; i < QK; i++) t += wq[b * QK + i] * a[b * QK + i];
        acc += (float)t * wd[b] * ad[b];
    }
    return acc;
#endif
}

/* Rows of up to three matrices that read the same quantised vector (one group size: native.py
 * checks, so one set of group sums gs), split over the team (an `omp for`: must be reached by every
 * thread of the team). out[j] receives matrix j's rows. */
static void gemv(const q4mat *const *ws, int n, float *const *outs, const int8_t *a, const float *ad,
                 const float *gs) {
    int total = 0;
    for (int j = 0; j < n; j++) total += ws[j]->rows;
#pragma omp for schedule(static)
    for (int r = 0; r < total; r++) {
        int j = 0, rr = r;
        while (rr >= ws[j]->rows) rr -= ws[j++]->rows;
        float y = row_q4(ws[j], rr, a, ad, gs);
        outs[j][rr] = ws[j]->bias ? y + ws[j]->bias[rr] : y;
    }
}

static void rope(float *x, const float *cs, const float *sn, int d) {
    int half = d / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cs[i] - b * sn[i];
        x[i + half] = b * cs[i + half] + a * sn[i + half];
    }
}

/* One token at position `pos`: its logits [vocab] and final hidden state [hidden]. cos/sin: that
 * position's rotary rows [head_dim]. keys/values: [layers][kv_heads][max_len][head_dim]. */
int qz_step(void *mp, int token, int pos, int max_len, const float *cs, const float *sn, float *keys,
            float *values, float *logits, float *hidden_out, int threads) {
    model_t *m = mp;
    if (pos < 0 || pos >= max_len || token < 0 || token >= m->vocab) return 1;
    if (max_len > m->score_cap) {
        float *sc = realloc(m->scores, sizeof(float) * (size_t)m->heads * max_len);
        if (!sc) return 2;
        m->scores = sc;
        m->score_cap = max_len;
    }
    const int H = m->hidden, D = m->head_dim, nh = m->heads, nkv = m->kv_heads, I = m->inter;
    const int group = nh / nkv;
    const size_t kv_stride = (size_t)max_len * D;
    memcpy(m->x, m->embed + (size_t)token * H, sizeof(float) * H);
    if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
    {
        for (int li = 0; li < m->n_layers; li++) {
            layer_t *l = &m->layers[li];
            float *kc = keys + (size_t)li * nkv * kv_stride, *vc = values + (size_t)li * nkv * kv_stride;
#pragma omp single
            {
                rmsnorm(m->xn, m->x, l->norm1, H, m->eps);
                quantize_input(m, m->xn, l->perm[0], H, l->q.g);
            }
            gemv((const q4mat *[]){&l->q, &l->k, &l->v}, 3,
                 (float *[]){m->qkv, m->qkv + nh * D, m->qkv + (nh + nkv) * D}, m->aq, m->ad, m->gs);
#pragma omp single
            {
                float *qv = m->qkv, *kv = m->qkv + nh * D, *vv = m->qkv + (nh + nkv) * D;
                for (int h = 0; h < nh; h++) rope(qv + h * D, cs, sn, D);
                for (int h = 0; h < nkv; h++) {
                    rope(kv + h * D, cs, sn, D);
                    memcpy(kc + h * kv_stride + (size_t)pos * D, kv + h * D, sizeof(float) * D);
                    memcpy(vc + h * kv_stride + (size_t)pos * D, vv + h * D, sizeof(float) * D);
                }
            }
#pragma omp for schedule(static)
            for (int h = 0; h < nh; h++) {
                const float *qh = m->qkv + h * D;
                const float *kh = kc + (size_t)(h / group) * kv_stride, *vh = vc + (size_t)(h / group) * kv_stride;
                float *sc = m->scores + (size_t)h * max_len, mx = -INFINITY;
                for (int t = 0; t <= pos; t++) {
                    const float *kt = kh + (size_t)t * D;
                    float dot = 0.f;
                    for (int i = 0; i < D; i++) dot += qh[i] * kt[i];
                    sc[t] = dot * m->scale;
                    mx = fmaxf(mx, sc[t]);
                }
                float sum = 0.f;
                for (int t = 0; t <= pos; t++) { sc[t] = expf(sc[t] - mx); sum += sc[t]; }
                float inv = 1.f / sum, *out = m->att + h * D;
                for (int i = 0; i < D; i++) out[i] = 0.f;
                for (int t = 0; t <= pos; t++) {
                    const float *vt = vh + (size_t)t * D;
                    float p = sc[t] * inv;
                    for (int i = 0; i < D; i++) out[i] += p * vt[i];
                }
            }
#pragma omp single
            quantize_input(m, m->att, l->perm[1], nh * D, l->o.g);
            gemv((const q4mat *[]){&l->o}, 1, (float *[]){m->tmp}, m->aq, m->ad, m->gs);
#pragma omp single
            {
                for (int i = 0; i < H; i++) m->x[i] += m->tmp[i];
                rmsnorm(m->xn, m->x, l->norm2, H, m->eps);
                quantize_input(m, m->xn, l->perm[2], H, l->gate.g);
            }
            gemv((const q4mat *[]){&l->gate, &l->up}, 2, (float *[]){m->gu, m->gu + I}, m->aq, m->ad, m->gs);
            /* SiLU(gate) * up, then quantised block by block (in the codes' column order), across the team */
#pragma omp for schedule(static)
            for (int i = 0; i < I; i++) {
                float g = m->gu[i];
                m->xn[i] = g / (1.f + expf(-g)) * m->gu[I + i];
            }
#pragma omp for schedule(static)
            for (int b = 0; b < I / QK; b++) {
                const int32_t *perm = l->perm[3];
                float *xb = m->xn + b * QK;
                if (perm) {
                    xb = m->xp + b * QK;
                    for (int i = 0; i < QK; i++) xb[i] = m->xn[perm[b * QK + i]];
                }
                quantize_block(xb, b, I, m->aq, m->ad);
            }
#pragma omp single
            group_sums(m->ad, I, l->down.g, m->gs);
            gemv((const q4mat *[]){&l->down}, 1, (float *[]){m->tmp}, m->aq, m->ad, m->gs);
#pragma omp single
            for (int i = 0; i < H; i++) m->x[i] += m->tmp[i];
        }
#pragma omp single
        {
            rmsnorm(hidden_out, m->x, m->final_norm, H, m->eps);
            quantize_q8(hidden_out, H, m->aq, m->ad);
        }
#pragma omp for schedule(static)
        for (int r = 0; r < m->vocab; r++) {
            float y = row_q8(m->head_q + (size_t)r * H, m->head_d + (size_t)r * (H / QK), H, m->aq, m->ad);
            logits[r] = m->head_bias ? y + m->head_bias[r] : y;
        }
    }
    return 0;
}
