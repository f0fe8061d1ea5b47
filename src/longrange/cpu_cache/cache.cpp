// A caching CPU allocator for torch: large blocks are kept when freed and handed out again,
// so their pages are not zero-filled by the kernel at every use. docs/ARCHITECTURE.md,
// "CPU allocation cache", says why and how; longrange/cpu_cache/__init__.py builds and loads
// this file.
//
// Blocks of at least `min_bytes` are private anonymous mappings rounded up to whole pages.
// A freed block goes into the cache. An allocation takes:
//   1. the smallest cached block that is large enough: whole when it is at most 1.25x the
//      size, else its head, the tail staying cached as a block of its own (its pages stay
//      resident either way);
//   2. else the largest cached block, grown with mremap: its resident pages are kept, only
//      the growth faults in new ones;
//   3. else a new mapping.
// The bytes kept in the cache never exceed (the highest live bytes so far - live bytes now +
// slack), so mapped bytes stay within the live high-water mark plus slack: at the live peak
// the cache holds at most `slack` bytes. Smaller blocks go to torch's own allocator.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <new>
#include <unordered_map>

namespace {

constexpr size_t kPage = 4096;

struct State {
  std::mutex mu;
  c10::Allocator* base = nullptr;  // the allocator found in place: small blocks, and back on disable
  bool enabled = false;
  size_t min_bytes = size_t(1) << 20;
  size_t slack = size_t(64) << 20;
  std::multimap<size_t, void*> cached;      // size -> address of a free block
  std::unordered_map<void*, size_t> live;  // address -> size of a block in use
  size_t live_bytes = 0, live_peak = 0, cached_bytes = 0, mapped_bytes = 0, mapped_peak = 0;
  uint64_t hits = 0, split = 0, grown = 0, mapped = 0, unmapped = 0;
};

State& state() {
  static State* s = new State();  // never destroyed: blocks may be freed at exit
  return *s;
}

void note_mapped(State& s, size_t add, size_t remove) {
  s.mapped_bytes = s.mapped_bytes + add - remove;
  if (s.mapped_bytes > s.mapped_peak) s.mapped_peak = s.mapped_bytes;
}

void unmap(State& s, void* ptr, size_t size) {
  munmap(ptr, size);
  note_mapped(s, 0, size);
  s.unmapped++;
}

// Evict cached blocks until the cache holds at most what the live high-water mark allows.
void trim(State& s) {
  size_t allowed = s.live_peak - s.live_bytes + s.slack;
  while (s.cached_bytes > allowed && !s.cached.empty()) {
    size_t excess = s.cached_bytes - allowed;
    auto it = s.cached.lower_bound(excess);  // the smallest block that covers the excess
    if (it == s.cached.end()) it = std::prev(s.cached.end());
    s.cached_bytes -= it->first;
    unmap(s, it->second, it->first);
    s.cached.erase(it);
  }
}

// torch's profiler sees our blocks as it sees its own allocator's (profile_memory=True)
void report(void* ptr, int64_t size, size_t live, size_t mapped) {
  c10::reportMemoryUsageToProfiler(ptr, size, live, mapped, c10::Device(c10::DeviceType::CPU));
}

void release(void* ptr) {
  State& s = state();
  size_t size = 0, live = 0, mapped = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.live.find(ptr);
    if (it != s.live.end()) {
      size = it->second;
      s.live.erase(it);
      s.live_bytes -= size;
      if (s.enabled) {
        s.cached.emplace(size, ptr);
        s.cached_bytes += size;
        trim(s);
      } else {
        unmap(s, ptr, size);
      }
      live = s.live_bytes;
      mapped = s.mapped_bytes;
    }
  }
  if (size == 0) {
    s.base->raw_deleter()(ptr);  // a small block, from the allocator found in place
    return;
  }
  report(ptr, -static_cast<int64_t>(size), live, mapped);
}

// A block of at least `size` bytes; `size` becomes the block's own size (a whole cached block
// may be up to 1.25x larger).
void* take(State& s, size_t& size) {
  void* ptr = nullptr;
  auto it = s.cached.lower_bound(size);  // the smallest cached block that is large enough
  if (it != s.cached.end()) {
    ptr = it->second;
    size_t have = it->first;
    s.cached.erase(it);
    s.cached_bytes -= have;
    if (have <= size + size / 4) {
      size = have;  // close enough: the whole block
      s.hits++;
    } else {
      // its head; the tail stays cached as a block of its own, its pages still resident
      s.cached.emplace(have - size, static_cast<char*>(ptr) + size);
      s.cached_bytes += have - size;
      s.split++;
    }
  } else if (!s.cached.empty()) {
    // the largest cached block, grown: its resident pages are kept, the rest faults in
    auto pick = std::prev(s.cached.end());
    size_t old = pick->first;
    void* from = pick->second;
    s.cached.erase(pick);
    s.cached_bytes -= old;
    void* moved = mremap(from, old, size, MREMAP_MAYMOVE);
    if (moved != MAP_FAILED) {
      ptr = moved;
      note_mapped(s, size, old);
      s.grown++;
    } else {
      unmap(s, from, old);
    }
  }
  if (ptr == nullptr) {
    void* fresh = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fresh == MAP_FAILED) return nullptr;
    ptr = fresh;
    note_mapped(s, size, 0);
    s.mapped++;
  }
  s.live.emplace(ptr, size);
  s.live_bytes += size;
  return ptr;
}

struct CachingAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    State& s = state();
    if (n < s.min_bytes) return s.base->allocate(n);
    size_t size = (n + kPage - 1) / kPage * kPage;
    void* ptr;
    size_t live = 0, mapped = 0;
    {
      std::lock_guard<std::mutex> lock(s.mu);
      ptr = take(s, size);
      if (ptr != nullptr) {
        if (s.live_bytes > s.live_peak) s.live_peak = s.live_bytes;
        trim(s);
        live = s.live_bytes;
        mapped = s.mapped_bytes;
      }
    }
    if (ptr == nullptr) {
      // let the allocator found in place try (and report the failure its usual way)
      return s.base->allocate(n);
    }
    report(ptr, static_cast<int64_t>(size), live, mapped);
    return c10::DataPtr(ptr, ptr, &release, c10::Device(c10::DeviceType::CPU));
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CachingAllocator& allocator() {
  static CachingAllocator* a = new CachingAllocator();
  return *a;
}

void lock_for_fork() { state().mu.lock(); }
void unlock_after_fork() { state().mu.unlock(); }

}  // namespace

// The priority outranks torch's own registration, and stays the same, so enable and disable
// can swap the two any number of times.
constexpr uint8_t kPriority = 100;

extern "C" int longrange_cache_enable(size_t min_bytes, size_t slack) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.base == nullptr) {
    s.base = c10::GetCPUAllocator();
    pthread_atfork(lock_for_fork, unlock_after_fork, unlock_after_fork);
  }
  s.min_bytes = min_bytes < kPage ? kPage : min_bytes;
  s.slack = slack;
  s.enabled = true;
  c10::SetCPUAllocator(&allocator(), kPriority);
  return 1;
}

extern "C" void longrange_cache_release() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  for (auto& block : s.cached) unmap(s, block.second, block.first);
  s.cached.clear();
  s.cached_bytes = 0;
  s.live_peak = s.live_bytes;
  s.mapped_peak = s.mapped_bytes;
}

extern "C" void longrange_cache_disable() {
  State& s = state();
  if (s.base == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.enabled = false;
    c10::SetCPUAllocator(s.base, kPriority);
  }
  longrange_cache_release();  // blocks still in use are unmapped when they are freed
}

// live, live peak, cached, mapped, mapped peak (bytes); hits, split, grown, mapped, unmapped
extern "C" void longrange_cache_stats(uint64_t* out) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  uint64_t values[] = {s.live_bytes, s.live_peak, s.cached_bytes, s.mapped_bytes, s.mapped_peak,
                       s.hits,       s.split,     s.grown,        s.mapped,    s.unmapped};
  std::memcpy(out, values, sizeof(values));
}
