/* record's per-batch statistics in one pass over the activations (neuronmap/record.py, Running.add_rows).

   For every neuron d and every recorded token r (row rows[r] of acts, store index first + r):
     - the top-N and bottom-N activations with their store index (kept sorted; a value equal to the N-th
       kept one does not enter, so the earliest of equal values stays);
     - the histogram count of its fine bin (neuronmap/bins.py: a lookup table of the top 14 bits);
     - the count of values > 0 and their sum (double).
   Neurons go in blocks of BLOCK so that a block's histogram rows (BLOCK x n_bins int32) stay in cache while
   its columns are read token by token; blocks are shared among threads. */
#include <stdint.h>
#include <string.h>

#define BLOCK 64

static void insert_desc(float *v, int64_t *ix, int64_t n, float x, int64_t i) {
    int64_t j = n - 1;
    while (j > 0 && v[j - 1] < x) { v[j] = v[j - 1]; ix[j] = ix[j - 1]; --j; }
    v[j] = x; ix[j] = i;
}

static void insert_asc(float *v, int64_t *ix, int64_t n, float x, int64_t i) {
    int64_t j = n - 1;
    while (j > 0 && v[j - 1] > x) { v[j] = v[j - 1]; ix[j] = ix[j - 1]; --j; }
    v[j] = x; ix[j] = i;
}

void nm_record(const float *acts, int64_t stride, const int64_t *rows, int64_t n_rows, int64_t first,
               int64_t d_mlp, int64_t n, float *top_v, int64_t *top_i, float *bot_v, int64_t *bot_i,
               int32_t *counts, int64_t n_bins, const int32_t *table, int top_bits,
               int64_t *positive, double *total, int threads) {
    const int shift = 32 - top_bits;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t d0 = 0; d0 < d_mlp; d0 += BLOCK) {
        const int64_t d1 = d0 + BLOCK < d_mlp ? d0 + BLOCK : d_mlp;
        double sum[BLOCK] = {0};
        int64_t pos[BLOCK] = {0};
        for (int64_t r = 0; r < n_rows; ++r) {
            const float *a = acts + rows[r] * stride;
            const int64_t at = first + r;
            for (int64_t d = d0; d < d1; ++d) {
                const float x = a[d];
                uint32_t bits;
                memcpy(&bits, &x, sizeof bits);
                counts[d * n_bins + table[bits >> shift]] += 1;
                pos[d - d0] += x > 0.0f;
                sum[d - d0] += x;
                if (x > top_v[d * n + n - 1]) insert_desc(top_v + d * n, top_i + d * n, n, x, at);
                if (x < bot_v[d * n + n - 1]) insert_asc(bot_v + d * n, bot_i + d * n, n, x, at);
            }
        }
        for (int64_t d = d0; d < d1; ++d) { positive[d] += pos[d - d0]; total[d] += sum[d - d0]; }
    }
}
