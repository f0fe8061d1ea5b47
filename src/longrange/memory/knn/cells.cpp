// The inverted file's scan and its choice of cells, for longrange/memory/knn/cells.py (which
// builds and loads this file; its docstring says why the scan is ours and how the keys are
// laid out).
#pragma GCC optimize("O3")  // the build's -O2 leaves the reductions below scalar
#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
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
// multiply-adds of consecutive dimensions do not wait on each other. An empty lane (its slot
// -1 in lane_slots) scores -inf, chosen in the store rather than by a branch per lane after it.
LONGRANGE_CLONES void score_block(const float* q, const float* block, const int64_t* lane_slots, int64_t dim,
                                  float* out) {
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
  const float none = -std::numeric_limits<float>::infinity();
#pragma omp simd
  for (int l = 0; l < 16; ++l) out[l] = lane_slots[l] < 0 ? none : (a0[l] + a1[l]) + (a2[l] + a3[l]);
}

// score_block for four queries (qs, outs) against one block: each row of the block is loaded
// once for the four, so a multiply-add takes 1.25 loads instead of 2. The same four partial
// sums per query, added in the same order, so every score is the float score_block gives.
LONGRANGE_CLONES void score_block4(const float* const* qs, const float* block, const int64_t* lane_slots, int64_t dim,
                                   float* const* outs) {
  float a[4][4][16] = {};  // [query][partial sum][lane]: 16 vector registers with AVX-512
  const float *q0 = qs[0], *q1 = qs[1], *q2 = qs[2], *q3 = qs[3];
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    for (int p = 0; p < 4; ++p) {
      const float x0 = q0[d + p], x1 = q1[d + p], x2 = q2[d + p], x3 = q3[d + p];
      const float* k = block + (d + p) * 16;
#pragma omp simd
      for (int l = 0; l < 16; ++l) {
        a[0][p][l] += x0 * k[l];
        a[1][p][l] += x1 * k[l];
        a[2][p][l] += x2 * k[l];
        a[3][p][l] += x3 * k[l];
      }
    }
  }
  for (; d < dim; ++d) {
    const float x0 = q0[d], x1 = q1[d], x2 = q2[d], x3 = q3[d];
    const float* k = block + d * 16;
#pragma omp simd
    for (int l = 0; l < 16; ++l) {
      a[0][0][l] += x0 * k[l];
      a[1][0][l] += x1 * k[l];
      a[2][0][l] += x2 * k[l];
      a[3][0][l] += x3 * k[l];
    }
  }
  const float none = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < 4; ++i) {
    float* out = outs[i];
#pragma omp simd
    for (int l = 0; l < 16; ++l)
      out[l] = lane_slots[l] < 0 ? none : (a[i][0][l] + a[i][1][l]) + (a[i][2][l] + a[i][3][l]);
  }
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
        found[m] = Candidate{row[c], c};  // kept where it reaches lo: no branch to mispredict
        m += row[c] >= lo;
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
// a query's cells in increasing order (the order of the scan); a position there names its
// column through the layout block each 16 of its scores came from (kept beside, not searched
// for after). Writes each query's k best (slot, score) pairs, best first (-1
// and -inf past the candidates found).
//
// Cell-major: every cell's blocks are read once for all the queries that probe it (they stay
// in L1), the queries split between the threads in contiguous ranges (no two threads write
// one query's candidates, nor, but at a range's edge, one cache line of the cursors: split by
// parity, the two threads' writes to interleaved cursors made them wait on each other's cache
// lines: 7.5 -> 6.8 ms for 2,048 queries at 32K entries); a thread's queries of a cell are
// scored four at a time (score_block4); each query's scores go to its part of the scratch, the
// layout block each 16 of them came from beside (block_of), then one selection per query
// (top_of_row) picks its best k. The memorizing chunk's search at 32K entries (2,048 queries,
// 24 probes, K = 32) on the 2-core CPU: 6.1 -> 4.6 ms with the four-query scoring, the
// selection's branch-free gathering and block_of (which replaced sorting each query's cells
// and mapping their blocks again after the scan).
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
    std::unique_ptr<int64_t[]> block_of(new int64_t[scratch_at[nq] / 16]);  // every entry is written
#pragma omp parallel num_threads(threads)
    {
      const int t = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t mine = nq * t / nt, theirs = nq * (t + 1) / nt;  // this thread's queries
      float spare[16];  // where the missing queries of a group of fewer than four write
      int64_t group[4];
      int g = 0;
      // scores the g (1 to 4) queries in group against cell c's blocks
      auto score_group = [&](int64_t c) {
        const float* qs[4];
        float* outs[4];
        for (int i = 0; i < 4; ++i) {
          qs[i] = queries + group[i < g ? i : 0] * dim;
          outs[i] = i < g ? scratch + cursor[group[i]] : spare;
        }
        for (int64_t b = first[c]; b < first[c] + used[c]; ++b) {
          const float* block = keys + b * dim * 16;
          if (g == 1) {
            score_block(qs[0], block, slots + b * 16, dim, outs[0]);
          } else {
            score_block4(qs, block, slots + b * 16, dim, outs);
          }
          for (int i = 0; i < g; ++i) {
            block_of[(outs[i] - scratch) / 16] = b;
            outs[i] += 16;
          }
        }
        for (int i = 0; i < g; ++i) cursor[group[i]] += used[c] * 16;
        g = 0;
      };
      for (int64_t c = 0; c < cells; ++c) {
        for (int64_t j = start[c]; j < start[c + 1]; ++j) {
          const int64_t qi = members[j];
          if (qi < mine || qi >= theirs) continue;
          // a query probing the cell twice (probes given twice) takes its turns in two groups:
          // one group's queries write their scores to distinct parts of the scratch
          if (std::find(group, group + g, qi) != group + g) score_group(c);
          group[g++] = qi;
          if (g == 4) score_group(c);
        }
        if (g) score_group(c);
      }
#pragma omp barrier
      Candidate* found = buffers.found_of(t);
#pragma omp for
      for (int64_t qi = 0; qi < nq; ++qi) {
        const int64_t at = scratch_at[qi];
        const int64_t m = top_of_row(scratch + at, scratch_at[qi + 1] - at, k, buffers.maxima_of(t), found, true);
        // block b of the query's scratch is block block_map[b] of the layout
        const int64_t* block_map = block_of.get() + at / 16;
        const int64_t mapped = (scratch_at[qi + 1] - at) / 16;
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
