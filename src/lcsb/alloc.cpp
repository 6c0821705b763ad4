// A caching CPU allocator for torch: large tensors reuse freed blocks of the same size instead of
// asking the kernel for fresh, zeroed pages every time.
//
// Why: a training step allocates and frees ~7 GB of tensors of 64 KB-30 MB (the same shapes, block
// after block). glibc either hands each one back to the kernel on free (what keeps the resident
// set near the live set, and costs a page fault per 4 KB on the next allocation: ~1.7M faults,
// a third of a step) or keeps them in its heap, where long-lived tensors allocated between
// temporaries fragment it (+120-360 MB resident, measured). Here every block of at least `small`
// bytes is its own anonymous mapping, so nothing long-lived can pin a hole, and a freed block is
// kept for the next request of its (page-rounded) size. The cache is emptied at phase boundaries
// (lcsb_alloc_release: end of forward, head, backward) and never holds more than `limit` bytes
// (the largest blocks go first; the engine sets it to one block's temporaries, lcsb_alloc_limit),
// so what the process holds stays within one block's temporaries of what it uses.
//
// Smaller requests go to c10's own alloc_cpu/free_cpu, as torch's default allocator does.
// Tensors allocated before installation keep their own deleter. Thread-safe (one mutex).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>
#include <sys/mman.h>

#include <cstdint>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kPage = 4096;

struct Pool {
  std::mutex mu;
  std::unordered_map<void*, size_t> live;   // large blocks handed out -> mapped size
  std::multimap<size_t, void*> cached;      // freed large blocks by mapped size
  size_t small = 64 << 10, limit = 64u << 20;   // lcsb_alloc_install sets both
  size_t in_use = 0, held = 0, cached_bytes = 0, peak_held = 0;
  uint64_t maps = 0, hits = 0, unmaps = 0;

  void unmap_locked(void* p, size_t n) {
    munmap(p, n);
    held -= n;
    ++unmaps;
  }

  void* get(size_t n) {
    size_t size = (n + kPage - 1) / kPage * kPage;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = cached.lower_bound(size);
      // reuse a block of this size, or up to 1/8 larger (the last chunk of a loop, a ragged batch)
      if (it != cached.end() && it->first <= size + size / 8) {
        void* p = it->second;
        size_t got = it->first;
        cached.erase(it);
        cached_bytes -= got;
        live.emplace(p, got);
        in_use += got;
        ++hits;
        return p;
      }
    }
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::lock_guard<std::mutex> g(mu);   // out of address space or memory: give the cache back, try once more
      for (auto& kv : cached) unmap_locked(kv.second, kv.first);
      cached.clear();
      cached_bytes = 0;
      p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      // the message torch's own allocator gives (a RuntimeError in Python)
      TORCH_CHECK(p != MAP_FAILED, "lcsb CPU allocator: not enough memory: you tried to allocate ", n, " bytes.");
    }
    std::lock_guard<std::mutex> g(mu);
    live.emplace(p, size);
    in_use += size;
    held += size;
    ++maps;
    if (held > peak_held) peak_held = held;
    return p;
  }

  // true when p was one of ours
  bool put(void* p) {
    std::lock_guard<std::mutex> g(mu);
    auto it = live.find(p);
    if (it == live.end()) return false;
    size_t size = it->second;
    live.erase(it);
    in_use -= size;
    cached.emplace(size, p);
    cached_bytes += size;
    evict_locked();                  // perhaps this very block
    return true;
  }

  void evict_locked() {   // over the limit: the largest blocks go first
    while (cached_bytes > limit) {
      auto last = std::prev(cached.end());
      cached_bytes -= last->first;
      unmap_locked(last->second, last->first);
      cached.erase(last);
    }
  }

  void release() {
    std::lock_guard<std::mutex> g(mu);
    for (auto& kv : cached) unmap_locked(kv.second, kv.first);
    cached.clear();
    cached_bytes = 0;
  }
};

Pool* pool() {
  static Pool* p = new Pool();   // never destroyed: tensors may outlive static destruction
  return p;
}

// fork() while another thread holds the lock would leave the child's copy locked forever
void before_fork() { pool()->mu.lock(); }
void after_fork() { pool()->mu.unlock(); }

void deleter(void* p) {
  if (p != nullptr && !pool()->put(p)) c10::free_cpu(p);
}

struct CachingAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void* p = n >= pool()->small ? pool()->get(n) : c10::alloc_cpu(n);
    return {p, p, &deleter, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &deleter; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

extern "C" {

// Make this the CPU allocator of torch. Returns 1 (idempotent).
int lcsb_alloc_install(size_t small, size_t limit) {
  static CachingAllocator* a = nullptr;
  Pool* p = pool();
  {
    std::lock_guard<std::mutex> g(p->mu);
    p->small = small < kPage ? kPage : small;
    p->limit = limit;
  }
  if (a == nullptr) {
    pthread_atfork(&before_fork, &after_fork, &after_fork);
    a = new CachingAllocator();
    c10::SetCPUAllocator(a, /*priority=*/10);
  }
  return 1;
}

// Keep at most `limit` bytes of freed blocks from now on.
void lcsb_alloc_limit(size_t limit) {
  Pool* p = pool();
  std::lock_guard<std::mutex> g(p->mu);
  p->limit = limit;
  p->evict_locked();
}

// Unmap every cached (free) block.
void lcsb_alloc_release() { pool()->release(); }

// in_use, held, cached, peak_held, maps, hits, unmaps
void lcsb_alloc_stats(uint64_t* out) {
  Pool* p = pool();
  std::lock_guard<std::mutex> g(p->mu);
  out[0] = p->in_use;
  out[1] = p->held;
  out[2] = p->cached_bytes;
  out[3] = p->peak_held;
  out[4] = p->maps;
  out[5] = p->hits;
  out[6] = p->unmaps;
}

}
