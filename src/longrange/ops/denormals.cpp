// Flush-to-zero and denormals-are-zero for torch's CPU threads: longrange/ops/numerics.py
// builds and loads this file and says why (subnormal operands cost matmuls and elementwise
// passes up to 100x on x86). The two bits live in each thread's MXCSR register, so setting
// them on the calling thread alone (torch.set_flush_denormal) leaves torch's intra-op
// workers, which do most of the work, as they were; here each worker sets its own.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
constexpr unsigned kFlushBits = 0x8040u;  // FTZ (bit 15) | DAZ (bit 6)

static void set_bits(bool on) {
  const unsigned csr = _mm_getcsr();
  _mm_setcsr(on ? (csr | kFlushBits) : (csr & ~kFlushBits));
}

extern "C" {
// Sets (on != 0) or clears both bits on the calling thread and every intra-op thread of
// torch's pool; returns how many threads it set.
int longrange_set_flush_denormals(int on) {
  std::atomic<int> count{1};
  set_bits(on != 0);
  const int64_t threads = at::get_num_threads();
  if (threads > 1 && !at::in_parallel_region()) {
    // one task per thread: at::parallel_for hands each of the pool's threads one index
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      if (at::get_thread_num() != 0) {
        set_bits(on != 0);
        count.fetch_add(1);
      }
    });
  }
  return count.load();
}

// Whether both bits are set on the calling thread.
int longrange_flush_denormals_state() { return (_mm_getcsr() & kFlushBits) == kFlushBits; }

int longrange_flush_denormals_supported() { return 1; }
}
#else
extern "C" {
int longrange_set_flush_denormals(int) { return 0; }
int longrange_flush_denormals_state() { return 0; }
int longrange_flush_denormals_supported() { return 0; }
}
#endif
