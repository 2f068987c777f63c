/* neuronmap's fused decode kernel: split-precision logits and their vocabulary reductions in one pass.
 *
 * For a block of normed states h [n, d_model] (fp32, given as two bf16 halves hi + lo) and a head W [d_vocab, d_model]
 * (bf16, or two bf16 halves Whi + Wlo), the logits z = hi.Whi + lo.Whi (+ hi.Wlo) are accumulated in fp32 with
 * AVX512-BF16 (vdpbf16ps) and reduced tile by tile, in registers, to what the atlas keeps per row and pole: the running
 * max m, s = sum exp(z - m), t = sum exp(z - m) (z - m) (log-sum-exp and entropy) and the top-k. No [n, d_vocab]
 * array is ever written. For an odd head (no biases) the - pole (the k smallest logits, and the sums of exp(-z)) is
 * reduced from the same tile.
 *
 * Layouts (made by neuronmap.fused):
 *   Wp: [n_panels][d2][nw][64][2] bf16: panels of 64 tokens, pairs of model dimensions (vdpbf16ps's operand).
 *   hi, lo: [n][2 * d2] bf16 rows.
 * Built by neuronmap.native (its KERNELS entry "fused" has the flags: -mavx512f -mavx512bw -mavx512vl -mavx512bf16 ...).
 */
#define _GNU_SOURCE  /* syscall() for the AMX permission request */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PANEL 64
#define MAXR 6
#define SLICES 8

typedef struct {
    float m[16], s[16], t[16];
} Sums;

/* exp(x) for x <= 0 (and a little above), relative error ~1e-7: 2^n * p(f), f = x - n ln2, degree-7 Taylor. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    f = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), f);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* c * tanh(z / c), as c * (1 - 2 / (exp(2 z / c) + 1)) on |z|, sign restored (absolute error ~1e-7 c). */
static inline __m512 softcap512(__m512 z, float c) {
    __m512 a = _mm512_abs_ps(z);
    __m512 e = exp512(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f / c)));  /* exp(-2|z|/c) in (0, 1] */
    __m512 th = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    __m512 r = _mm512_mul_ps(th, _mm512_set1_ps(c));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r),
        _mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32((int)0x80000000u))));
}

/* Online (m, s, t) per lane; lanes outside `valid` are left alone. */
static inline void update_sums(Sums *S, __m512 z, __mmask16 valid) {
    __m512 m = _mm512_loadu_ps(S->m), s = _mm512_loadu_ps(S->s), t = _mm512_loadu_ps(S->t);
    __m512 mn = _mm512_mask_max_ps(m, valid, m, z);
    if (_mm512_cmp_ps_mask(mn, m, _CMP_GT_OQ)) {
        /* t' = a (t + s (m - mn)), s' = a s with a = exp(m - mn): the sums re-based on the new max */
        __m512 dm = _mm512_sub_ps(m, mn), a = exp512(dm);
        t = _mm512_mul_ps(a, _mm512_fmadd_ps(s, dm, t));
        s = _mm512_mul_ps(a, s);
        m = mn;
        _mm512_storeu_ps(S->m, m);
    }
    __m512 y = _mm512_maskz_sub_ps(valid, z, m);
    __m512 e = _mm512_maskz_mov_ps(valid, exp512(y));
    _mm512_storeu_ps(S->s, _mm512_add_ps(s, e));
    _mm512_storeu_ps(S->t, _mm512_fmadd_ps(e, y, t));
}

/* Insert the lanes of z above the k-th best into a sorted (descending) list. */
static inline void update_top(float *vals, int32_t *ids, int k, __m512 z, __mmask16 valid, int v0) {
    __mmask16 hit = _mm512_mask_cmp_ps_mask(valid, z, _mm512_set1_ps(vals[k - 1]), _CMP_GT_OQ);
    if (!hit) return;
    float buf[16];
    _mm512_storeu_ps(buf, z);
    while (hit) {
        int lane = __builtin_ctz(hit);
        hit &= hit - 1;
        float x = buf[lane];
        if (!(x > vals[k - 1])) continue;
        int j = k - 1;
        while (j > 0 && vals[j - 1] < x) { vals[j] = vals[j - 1]; ids[j] = ids[j - 1]; j--; }
        vals[j] = x;
        ids[j] = v0 + lane;
    }
}

typedef struct {
    Sums *sums;      /* [n][poles] */
    float *vals;     /* [n][poles][k] */
    int32_t *ids;
} State;

/* One tile: rows r0 .. r0+R-1 against panel p, then its reductions. R and NW are constants after inlining. */
typedef struct {
    const uint16_t *Wp, *hi, *lo;
    int ld, d2, V, poles, k;
    const float *bias;
    float cap;
} Args;

/* The reductions of 16 logits of one row (tokens v0 .. v0+15): bias, softcap, then both poles' sums and top-k. */
static inline void reduce16(const Args *g, State *st, int r, int v0, __m512 acc) {
    int V = g->V, poles = g->poles, k = g->k;
    __mmask16 valid = v0 >= V ? 0 : (V - v0 >= 16 ? 0xFFFF : (__mmask16)((1u << (V - v0)) - 1));
    if (!valid) return;
    __m512 z = g->bias ? _mm512_add_ps(acc, _mm512_maskz_loadu_ps(valid, g->bias + v0)) : acc;
    if (g->cap > 0) z = softcap512(z, g->cap);
    size_t row = (size_t)r * poles;
    update_sums(&st->sums[row], z, valid);
    update_top(st->vals + row * k, st->ids + row * k, k, z, valid, v0);
    if (poles == 2) {
        __m512 zm = _mm512_sub_ps(_mm512_setzero_ps(), z);
        update_sums(&st->sums[row + 1], zm, valid);
        update_top(st->vals + (row + 1) * k, st->ids + (row + 1) * k, k, zm, valid, v0);
    }
}

static inline __attribute__((always_inline)) void tile(int R, int NW, const Args *g, int p, int r0, State *st) {
    const uint16_t *hi = g->hi, *lo = g->lo;
    int ld = g->ld, d2 = g->d2;
    __m512 acc[MAXR][4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    const uint16_t *w = g->Wp + (size_t)p * d2 * NW * PANEL * 2;
    for (int q = 0; q < d2; q++) {
        __m512bh b[2][4];
        for (int h = 0; h < NW; h++)
            for (int j = 0; j < 4; j++) b[h][j] = (__m512bh)_mm512_loadu_si512(w + ((size_t)(q * NW + h) * PANEL + 16 * j) * 2);
        for (int r = 0; r < R; r++) {
            int32_t ah, al;
            memcpy(&ah, hi + (size_t)(r0 + r) * ld + 2 * q, 4);
            memcpy(&al, lo + (size_t)(r0 + r) * ld + 2 * q, 4);
            __m512bh xh = (__m512bh)_mm512_set1_epi32(ah), xl = (__m512bh)_mm512_set1_epi32(al);
            for (int j = 0; j < 4; j++) {
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xh, b[0][j]);
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xl, b[0][j]);
                if (NW == 2) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xh, b[1][j]);
            }
        }
    }
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < R; r++) reduce16(g, st, r0 + r, p * PANEL + 16 * j, acc[r][j]);
}

#define TILE_CASES(NW) \
    switch (R) { \
    case 6: tile(6, NW, g, p, r0, st); break; \
    case 5: tile(5, NW, g, p, r0, st); break; \
    case 4: tile(4, NW, g, p, r0, st); break; \
    case 3: tile(3, NW, g, p, r0, st); break; \
    case 2: tile(2, NW, g, p, r0, st); break; \
    default: tile(1, NW, g, p, r0, st); break; \
    }

static void tiles_nw1(const Args *g, int p, int r0, int R, State *st) { TILE_CASES(1) }
static void tiles_nw2(const Args *g, int p, int r0, int R, State *st) { TILE_CASES(2) }


#ifdef NM_AMX
/* AMX-BF16 (built as the "fused_amx" kernel, with -DNM_AMX): the same products on the tile unit, 16 rows x 64
 * tokens at a time, fp32 accumulation in tiles as vdpbf16ps does; then the same reductions. The packed panels are
 * already the B operand's layout (pairs of model dimensions x 16 tokens x 2), so nothing is repacked. */
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Linux hands out the tile state only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA): 0 when granted. */
int nm_amx_init(void) { return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 0 : -1; }

static void amx_config(void) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    _tile_loadconfig(&c);
}

/* tmm0-3: the 4 x 16 tokens' fp32 sums; tmm4, tmm5: hi, lo rows (16 x 32 dims); tmm6, tmm7: the head's hi, lo. */
#define AMX_J(J) do { \
        _tile_loadd(6, w + ((size_t)(q * NW) * PANEL + 16 * (J)) * 2, bstride); \
        _tile_dpbf16ps(J, 4, 6); \
        _tile_dpbf16ps(J, 5, 6); \
        if (NW == 2) { _tile_loadd(7, w + ((size_t)(q * NW + 1) * PANEL + 16 * (J)) * 2, bstride); _tile_dpbf16ps(J, 4, 7); } \
    } while (0)

static void amx_tile(int NW, const Args *g, int p, int r0, State *st) {
    float buf[16 * PANEL] __attribute__((aligned(64)));
    int ld = g->ld, d2 = g->d2;
    const uint16_t *w = g->Wp + (size_t)p * d2 * NW * PANEL * 2;
    size_t bstride = (size_t)NW * PANEL * 2 * 2, astride = (size_t)ld * 2;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int q = 0; q < d2; q += 16) {
        _tile_loadd(4, g->hi + (size_t)r0 * ld + 2 * q, astride);
        _tile_loadd(5, g->lo + (size_t)r0 * ld + 2 * q, astride);
        AMX_J(0); AMX_J(1); AMX_J(2); AMX_J(3);
    }
    _tile_stored(0, buf, PANEL * 4); _tile_stored(1, buf + 16, PANEL * 4);
    _tile_stored(2, buf + 32, PANEL * 4); _tile_stored(3, buf + 48, PANEL * 4);
    for (int j = 0; j < 4; j++)
        for (int r = 0; r < 16; r++) reduce16(g, st, r0 + r, p * PANEL + 16 * j, _mm512_load_ps(buf + r * PANEL + 16 * j));
}
#endif

/* The kernel's version: neuronmap.fused checks it after loading. */
int nm_version(void) { return 6; }

/* Decode a block. Outputs per pole (0: +, 1: -) and row: m [poles][n] (float), s and t [poles][n] (double),
 * top-k values [poles][n][k] (descending) and ids. Returns 0, or -1 when memory runs out. */
int nm_decode(const uint16_t *Wp, int nw, int d2, int V, const uint16_t *hi, const uint16_t *lo, int n,
              const float *bias, float cap, int poles, int k,
              int n_threads,
              float *m_out, double *s_out, double *t_out, float *top_vals, int32_t *top_ids) {
    int n_panels = (V + PANEL - 1) / PANEL, failed = 0;
    Args g = {Wp, hi, lo, 2 * d2, d2, V, poles, k, bias, cap};
    /* The vocabulary is cut into a fixed number of slices, each with its own sums, merged in a fixed order: the
     * result is the same bits whatever the number of threads (a Ray worker with one thread, a laptop with eight). */
    int n_slices = n_panels < SLICES ? n_panels : SLICES;
    if (n_threads < 1) n_threads = 1;
    State *states = calloc(n_slices, sizeof(State));
    if (!states) return -1;
    for (int i = 0; i < n_slices; i++) {
        states[i].sums = aligned_alloc(64, sizeof(Sums) * (size_t)n * poles);
        states[i].vals = malloc(sizeof(float) * (size_t)n * poles * k);
        states[i].ids = malloc(sizeof(int32_t) * (size_t)n * poles * k);
        if (!states[i].sums || !states[i].vals || !states[i].ids) { failed = 1; continue; }
        for (size_t j = 0; j < (size_t)n * poles; j++)
            for (int l = 0; l < 16; l++) {
                states[i].sums[j].m[l] = -1e30f;  /* finite: (m - m') and s * (m - m') stay finite */
                states[i].sums[j].s[l] = 0.0f;
                states[i].sums[j].t[l] = 0.0f;
            }
        for (size_t j = 0; j < (size_t)n * poles * k; j++) { states[i].vals[j] = -INFINITY; states[i].ids[j] = -1; }
    }
    if (!failed) {
#pragma omp parallel for schedule(static) num_threads(n_threads)
        for (int sl = 0; sl < n_slices; sl++) {
            State *st = &states[sl];
            int p0 = (int)((long)n_panels * sl / n_slices), p1 = (int)((long)n_panels * (sl + 1) / n_slices);
            int amx_rows = 0;
#ifdef NM_AMX
            if (d2 % 16 == 0) { amx_config(); amx_rows = n / 16 * 16; }  /* whole 16-row tiles; the rest below */
#endif
            for (int p = p0; p < p1; p++) {
#ifdef NM_AMX
                for (int r0 = 0; r0 < amx_rows; r0 += 16) amx_tile(nw, &g, p, r0, st);
#endif
                for (int r0 = amx_rows; r0 < n; r0 += MAXR) {
                    int R = n - r0 < MAXR ? n - r0 : MAXR;
                    if (nw == 2) tiles_nw2(&g, p, r0, R, st);
                    else tiles_nw1(&g, p, r0, R, st);
                }
            }
#ifdef NM_AMX
            if (amx_rows) _tile_release();
#endif
        }
        /* Merge the slices' lanes: each (m, s, t) re-based on the overall max, in double; top-k lists merged. */
        for (size_t j = 0; j < (size_t)n * poles; j++) {
            float m = -1e30f;
            for (int i = 0; i < n_slices; i++)
                for (int l = 0; l < 16; l++) if (states[i].sums[j].m[l] > m) m = states[i].sums[j].m[l];
            double s = 0, t = 0;
            for (int i = 0; i < n_slices; i++)
                for (int l = 0; l < 16; l++) {
                    const Sums *S = &states[i].sums[j];
                    double dm = (double)S->m[l] - m, a = exp(dm);
                    s += a * S->s[l];
                    t += a * (S->t[l] + S->s[l] * dm);
                }
            size_t pole = j % poles, row = j / poles, o = pole * (size_t)n + row;
            m_out[o] = m; s_out[o] = s; t_out[o] = t;
            float *tv = top_vals + o * k;
            int32_t *ti = top_ids + o * k;
            for (int l = 0; l < k; l++) { tv[l] = -INFINITY; ti[l] = -1; }
            for (int i = 0; i < n_slices; i++)
                for (int l = 0; l < k; l++) {
                    float x = states[i].vals[j * k + l];
                    if (!(x > tv[k - 1])) break;  /* each list is sorted */
                    int q = k - 1;
                    int32_t id = states[i].ids[j * k + l];
                    /* ties: the lower token id first, whatever thread found it */
                    while (q > 0 && (tv[q - 1] < x || (tv[q - 1] == x && ti[q - 1] > id))) { tv[q] = tv[q - 1]; ti[q] = ti[q - 1]; q--; }
                    tv[q] = x; ti[q] = id;
                }
        }
    }
    for (int i = 0; i < n_slices; i++) { free(states[i].sums); free(states[i].vals); free(states[i].ids); }
    free(states);
    return failed ? -1 : 0;
}
