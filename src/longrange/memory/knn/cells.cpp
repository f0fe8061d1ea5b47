// The inverted file's scan and its choice of cells, for longrange/memory/knn/cells.py (which
// builds and loads this file; its docstring says why the scan is ours and how the keys are
// laid out).
#pragma GCC optimize("O3")  // the build's -O2 leaves the reductions below scalar
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include <omp.h>

namespace {

struct Candidate {
  float score;
  int64_t index;
};

bool better(const Candidate& a, const Candidate& b) { return a.score > b.score; }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LONGRANGE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LONGRANGE_CLONES
#endif

constexpr int kRuns = 16;

// 16 scores of one query against one block [dim][16]; four partial sums so that the
// multiply-adds of consecutive dimensions do not wait on each other.
LONGRANGE_CLONES void score_block(const float* q, const float* block, int64_t dim, float* out) {
  float a0[16] = {0}, a1[16] = {0}, a2[16] = {0}, a3[16] = {0};
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    const float q0 = q[d], q1 = q[d + 1], q2 = q[d + 2], q3 = q[d + 3];
    const float* k = block + d * 16;
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      a0[l] += q0 * k[l];
      a1[l] += q1 * k[16 + l];
      a2[l] += q2 * k[32 + l];
      a3[l] += q3 * k[48 + l];
    }
  }
  for (; d < dim; ++d) {
    const float qd = q[d];
#pragma omp simd
    for (int l = 0; l < 16; ++l) a0[l] += qd * block[d * 16 + l];
  }
#pragma omp simd
  for (int l = 0; l < 16; ++l) out[l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
}

// The k best of row[0 .. n) into found[0 .. min(k, n)), best first when `ordered` (else in
// no order; index: the position in the row); maxima holds n / kRuns floats, found n
// candidates. The row is cut into kRuns runs
// of `width`, group j being positions j, j + width, ...: the group maxima (a vertical max over
// the runs), then v, bisected, the largest value tried with at least k maxima >= v (so at
// least k positions reach v: the k-th best is at least v), then the positions >= v of the
// groups whose maximum reaches v (about k of them), cut to the best k. Returns how many.
LONGRANGE_CLONES int64_t top_of_row(const float* row, int64_t n, int64_t k, float* maxima, Candidate* found,
                                    bool ordered) {
  const int64_t width = n / kRuns;
  int64_t m = 0;
  if (width >= k) {
    // each vector of group maxima stays in a register over the runs (stored once)
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      float most = row[j];
      for (int r = 1; r < kRuns; ++r) most = std::max(most, row[r * width + j]);
      maxima[j] = most;
    }
    float lo = maxima[0], hi = maxima[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
    for (int64_t j = 1; j < width; ++j) {
      lo = std::min(lo, maxima[j]);
      hi = std::max(hi, maxima[j]);
    }
    // 32-bit counts: 16 lanes a vector, not 8 (and no spilled 64-bit accumulator); a split
    // that leaves exactly k maxima is as good as it gets
    const int wanted = int(k);
    for (int step = 0; step < 10 && lo < hi; ++step) {
      const float mid = lo + (hi - lo) * 0.5f;
      int reach = 0;
#pragma omp simd reduction(+ : reach)
      for (int64_t j = 0; j < width; ++j) reach += maxima[j] >= mid ? 1 : 0;
      if (reach >= wanted) {
        lo = mid;
        if (reach == wanted) break;
      } else {
        hi = mid;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      if (!(maxima[j] >= lo)) continue;
      for (int r = 0; r < kRuns; ++r) {
        const int64_t c = r * width + j;
        if (row[c] >= lo) found[m++] = Candidate{row[c], c};
      }
    }
    for (int64_t c = kRuns * width; c < n; ++c)
      if (row[c] >= lo) found[m++] = Candidate{row[c], c};
  }
  if (m < std::min(k, n)) {  // few positions, or NaN scores (which compare false): take all
    m = 0;
    for (int64_t c = 0; c < n; ++c) found[m++] = Candidate{row[c], c};
  }
  if (m > k) {
    std::nth_element(found, found + (k - 1), found + m, better);
    m = k;
  }
  if (ordered) std::sort(found, found + m, better);
  return m;
}

// The buffers of top_of_row for each thread, for rows of up to `width` entries: made before a
// parallel region, where a failed allocation would end the process instead of returning.
struct RowBuffers {
  RowBuffers(int threads, int64_t width)
      : groups(width / kRuns + 1), span(width + 1), maxima(size_t(threads) * groups), found(size_t(threads) * span) {}
  float* maxima_of(int t) { return maxima.data() + size_t(t) * groups; }
  Candidate* found_of(int t) { return found.data() + size_t(t) * span; }
  int64_t groups, span;
  std::vector<float> maxima;
  std::vector<Candidate> found;
};

}  // namespace

// The columns of each row's k largest scores [rows][columns], in no order: the probed cells of
// a search.
extern "C" int longrange_top_columns(const float* scores, int64_t rows, int64_t columns, int64_t k,
                                     int64_t* out, int threads) {
  if (k <= 0) return 0;
  if (k > columns) return 2;
  threads = std::max(threads, 1);
  try {
    RowBuffers buffers(threads, columns);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num();
      Candidate* found = buffers.found_of(t);
#pragma omp for
      for (int64_t r = 0; r < rows; ++r) {
        top_of_row(scores + r * columns, columns, k, buffers.maxima_of(t), found, false);
        for (int64_t j = 0; j < k; ++j) out[r * k + j] = found[j].index;
      }
    }
  } catch (...) {
    return 1;
  }
  return 0;
}

// keys: [blocks][dim][16] float32, each block 16 keys of one cell as columns; slots:
// [blocks * 16] int64, the store slot of each column (-1: empty); first / used: [cells] the
// first block of each cell and how many of its blocks hold keys. queries [nq][dim], probes
// [nq][np] (distinct cells; -1: none). scratch: room for every query's candidate scores, sum
// over its probes of used * 16, laid out query after query (scratch_at [nq + 1] the offsets),
// a query's cells in increasing order (the order of the scan), so a position there names its
// column without storing it. Writes each query's k best (slot, score) pairs, best first (-1
// and -inf past the candidates found).
//
// Cell-major: every cell's blocks are read once for all the queries that probe it (they stay
// in L1), the queries split between the threads in contiguous ranges (no two threads write
// one query's candidates, nor, but at a range's edge, one cache line of the cursors: split by
// parity, the two threads' writes to interleaved cursors made them wait on each other's cache
// lines: 7.5 -> 6.8 ms for 2,048 queries at 32K entries); each query's scores go to its part of the scratch, then one selection per query
// (top_of_row) picks its best k.
extern "C" int longrange_cells_search(const float* keys, const int64_t* slots, const int64_t* first,
                                      const int64_t* used, int64_t cells, const float* queries,
                                      const int64_t* probes, int64_t nq, int64_t np, int64_t dim, int64_t k,
                                      float* scratch, const int64_t* scratch_at,
                                      int64_t* out_slots, float* out_scores, int threads) {
  const float none = -std::numeric_limits<float>::infinity();
  if (k <= 0) return 0;
  threads = std::max(threads, 1);
  try {
    // the queries of every cell, cell by cell
    std::vector<int64_t> start(cells + 1, 0);
    for (int64_t i = 0; i < nq * np; ++i)
      if (probes[i] >= 0 && probes[i] < cells) start[probes[i] + 1]++;
    for (int64_t c = 0; c < cells; ++c) start[c + 1] += start[c];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    std::vector<int32_t> members(start[cells]);
    for (int64_t i = 0; i < nq * np; ++i)
      if (probes[i] >= 0 && probes[i] < cells) members[fill[probes[i]]++] = int32_t(i / np);
    std::vector<int64_t> cursor(scratch_at, scratch_at + nq);
    int64_t widest = 0;
    for (int64_t qi = 0; qi < nq; ++qi) widest = std::max(widest, scratch_at[qi + 1] - scratch_at[qi]);
    RowBuffers buffers(threads, widest);
    std::vector<int64_t> orders(size_t(threads) * np);
    const int64_t most_blocks = widest / 16 + 1;
    std::vector<int64_t> block_maps(size_t(threads) * most_blocks);
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t mine = nq * t / nt, theirs = nq * (t + 1) / nt;  // this thread's queries
      for (int64_t c = 0; c < cells; ++c) {
        for (int64_t j = start[c]; j < start[c + 1]; ++j) {
          const int64_t qi = members[j];
          if (qi < mine || qi >= theirs) continue;
          const float* q = queries + qi * dim;
          int64_t at = cursor[qi];
          for (int64_t b = first[c]; b < first[c] + used[c]; ++b, at += 16) {
            score_block(q, keys + b * dim * 16, dim, scratch + at);
            for (int l = 0; l < 16; ++l)
              if (slots[b * 16 + l] < 0) scratch[at + l] = none;
          }
          cursor[qi] = at;
        }
      }
#pragma omp barrier
      Candidate* found = buffers.found_of(t);
      int64_t* order = orders.data() + size_t(t) * np;
      int64_t* block_map = block_maps.data() + size_t(t) * most_blocks;
#pragma omp for
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t at = scratch_at[qi];
        const int64_t m = top_of_row(scratch + at, scratch_at[qi + 1] - at, k, buffers.maxima_of(t), found, true);
        int64_t probed = 0;  // the query's cells in the order the scan filled its scratch
        for (int64_t p = 0; p < np; ++p) {
          const int64_t c = probes[qi * np + p];
          if (c >= 0 && c < cells) order[probed++] = c;
        }
        std::sort(order, order + probed);
        // block b of the query's scratch is block block_map[b] of the layout (looked up, not
        // found by walking the cells for each of the k best: 6.8 -> 5.9 ms at 32K entries)
        int64_t mapped = 0;
        for (int64_t p = 0; p < probed; ++p)
          for (int64_t b = first[order[p]]; b < first[order[p]] + used[order[p]]; ++b) block_map[mapped++] = b;
        for (int64_t j = 0; j < k; ++j) {
          const bool real = j < m && found[j].score > none;
          const int64_t position = real ? found[j].index : -1;
          const int64_t column = position >= 0 && position / 16 < mapped ? block_map[position / 16] * 16 + position % 16 : -1;
          out_scores[qi * k + j] = real ? found[j].score : none;
          out_slots[qi * k + j] = column >= 0 ? slots[column] : -1;
        }
      }
    }
  } catch (...) {
    return 1;
  }
  return 0;
}

// Appends n keys [n][dim] to the end of their cells [n] (in [0, cells)), in input order within
// a cell: the layout's keys [blocks][dim][16] and slots [blocks * 16], the cells' filled
// columns [cells] (updated), and for each store slot [n] its column and cell ([capacity]
// each, updated). first / room [cells]: each cell's first block and its blocks. Returns 1
// (nothing written) when a key's cell is out of range or a cell would overflow.
extern "C" int longrange_cells_place(const float* keys, const int64_t* key_cells, const int64_t* key_slots, int64_t n,
                                     int64_t dim, int64_t cells, const int64_t* first, const int64_t* room,
                                     float* layout, int64_t* slots, int64_t* filled, int64_t* column,
                                     int64_t* cell_of) {
  try {
    std::vector<int64_t> count(cells, 0);
    for (int64_t i = 0; i < n; ++i) {
      if (key_cells[i] < 0 || key_cells[i] >= cells) return 1;
      count[key_cells[i]]++;
    }
    for (int64_t c = 0; c < cells; ++c)
      if (count[c] && filled[c] + count[c] > room[c] * 16) return 1;
    // cell by cell (a counting sort, stable): a block's 16 lanes are written together, where
    // keys in input order would touch a fresh cache line for every dimension of every key
    std::vector<int64_t> start(cells + 1, 0), order(n);
    for (int64_t c = 0; c < cells; ++c) start[c + 1] = start[c] + count[c];
    for (int64_t i = 0; i < n; ++i) order[start[key_cells[i]]++] = i;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t i = order[j], c = key_cells[i], at = first[c] * 16 + filled[c]++;
      float* lane = layout + (at / 16) * dim * 16 + at % 16;
      for (int64_t d = 0; d < dim; ++d) lane[d * 16] = keys[i * dim + d];
      slots[at] = key_slots[i];
      column[key_slots[i]] = at;
      cell_of[key_slots[i]] = c;
    }
  } catch (...) {
    return 2;
  }
  return 0;
}
