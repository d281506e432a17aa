// The shared-memory all-reduce of workers/shm_comm.py, in C++, for collectives inside one op call
// (tpserve::llama_decode_layers at tp > 1: o_proj's and down_proj's partial sums, 60 per SmolLM2
// token, without returning to Python between layers).
//
// Same segment, same protocol, same arithmetic as ShmCommunicator.all_reduce, so a step may mix
// the two freely (the Python side hands its sequence counters in and takes them back):
//   - collective `seq` uses the slots of parity seq % 2; a rank first waits until every rank has
//     arrived at seq - 1 (so nobody still reads the slot it is about to overwrite);
//   - it copies its part into its slot, stores seq in its arrival word (release), wakes a peer
//     asleep on that word, waits for every other rank's word to reach seq (acquire), and sums the
//     slots in rank order (slot 0 + slot 1, then + slot r): every rank holds the same bits, and
//     the bits ShmCommunicator's torch.add would give;
//   - waiting spins ~100 us, then sleeps on a futex over the peer's word, checking every 0.1 s that
//     the peer's process still exists (kill(pid, 0), a zombie counts as gone) and failing after the
//     group's collective timeout. Failures raise with "tpserve-shm:" first, which the Python caller
//     turns into a WorkerError as the Python protocol raises.
#pragma once

#include <ATen/ATen.h>

#include <linux/futex.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace tpserve_shm {

// The layout of workers/shm_comm.py.
constexpr int64_t kControlBytes = 4096;
constexpr int64_t kLine = 64;  // per rank: arrival word (u32), sleeping word (u32), pid (i64 at +8)
constexpr double kSpinS = 100e-6;
constexpr double kLivenessS = 0.1;

// What the Python side hands over, as an int64 tensor (ShmCommunicator.stack_state):
// [segment address, rank, size, slot bytes, timeout ns, seq, all_seen, nanoseconds spent waiting].
enum StateField : int64_t { kBase, kRank, kSize, kSlotBytes, kTimeoutNs, kSeq, kAllSeen, kWaitNs, kFields };

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

inline bool reached(uint32_t word, uint32_t seq) { return static_cast<uint32_t>(word - seq) < (1u << 31); }

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

inline bool alive(int64_t pid) {
  if (pid <= 0) return false;
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return true;
  char buf[512];
  const size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
  std::fclose(f);
  buf[n] = 0;
  const char* close = std::strrchr(buf, ')');  // the state follows the command name
  if (close == nullptr || close[1] == 0 || close[2] == 0) return true;
  return close[2] != 'Z' && close[2] != 'X';
}

class Comm {
 public:
  explicit Comm(at::Tensor state) : state_(std::move(state)) {
    TORCH_CHECK(state_.scalar_type() == at::kLong && state_.numel() == kFields && state_.is_contiguous(),
                "tpserve-shm: the state is ", kFields, " int64 values");
    int64_t* s = state_.data_ptr<int64_t>();
    base_ = reinterpret_cast<char*>(s[kBase]);
    rank_ = s[kRank];
    size_ = s[kSize];
    slot_bytes_ = s[kSlotBytes];
    timeout_s_ = static_cast<double>(s[kTimeoutNs]) * 1e-9;
    seq_ = static_cast<uint32_t>(s[kSeq]);
    all_seen_ = static_cast<uint32_t>(s[kAllSeen]);
  }

  // Back into the state: the Python side reads the counters after the call.
  ~Comm() {
    int64_t* s = state_.data_ptr<int64_t>();
    s[kSeq] = seq_;
    s[kAllSeen] = all_seen_;
    s[kWaitNs] += static_cast<int64_t>(wait_s_ * 1e9);
  }

  // Sum x over the ranks, in place (ShmCommunicator.all_reduce).
  void all_reduce(at::Tensor& x) {
    TORCH_CHECK(x.is_contiguous(), "tpserve-shm: all_reduce takes a contiguous tensor");
    at::Tensor flat = x.view(-1);
    const int64_t step = slot_bytes_ / x.element_size();
    for (int64_t start = 0; start < flat.numel(); start += step) {
      at::Tensor part = flat.slice(0, start, std::min(flat.numel(), start + step));
      const int64_t k = part.numel();
      const int parity = begin();
      slot(parity, rank_, x, k).copy_(part);
      arrive();
      wait_others(seq_);
      at::add_out(part, slot(parity, 0, x, k), slot(parity, 1, x, k));
      for (int64_t r = 2; r < size_; ++r) part.add_(slot(parity, r, x, k));
    }
  }

 private:
  uint32_t* word(int64_t r, int64_t i) { return reinterpret_cast<uint32_t*>(base_ + r * kLine) + i; }
  int64_t pid(int64_t r) { return *reinterpret_cast<int64_t*>(base_ + r * kLine + 8); }

  at::Tensor slot(int parity, int64_t r, const at::Tensor& like, int64_t k) {
    char* p = base_ + kControlBytes + (parity * size_ + r) * slot_bytes_;
    return at::from_blob(p, {k}, like.options());
  }

  int begin() {
    seq_ += 1;
    const uint32_t prev = seq_ - 1;
    if (!reached(all_seen_, prev)) wait_others(prev);
    return seq_ & 1;
  }

  void arrive() {
    __atomic_store_n(word(rank_, 0), seq_, __ATOMIC_RELEASE);
    for (int64_t r = 0; r < size_; ++r) {  // wake a peer asleep on our word
      if (r != rank_ && __atomic_load_n(word(r, 1), __ATOMIC_ACQUIRE) == static_cast<uint32_t>(rank_ + 1)) {
        syscall(SYS_futex, word(rank_, 0), FUTEX_WAKE, 0x7FFFFFFF, nullptr, nullptr, 0);
        break;
      }
    }
  }

  void wait_others(uint32_t seq) {
    double t0 = -1;
    for (int64_t r = 0; r < size_; ++r) {
      if (r == rank_ || reached(__atomic_load_n(word(r, 0), __ATOMIC_ACQUIRE), seq)) continue;
      if (t0 < 0) t0 = now_s();
      const double spin_until = t0 + kSpinS;
      while (!reached(__atomic_load_n(word(r, 0), __ATOMIC_ACQUIRE), seq) && now_s() < spin_until) {
        cpu_relax();
      }
      if (!reached(__atomic_load_n(word(r, 0), __ATOMIC_ACQUIRE), seq)) sleep_on(r, seq, t0);
    }
    if (t0 >= 0) wait_s_ += now_s() - t0;
    all_seen_ = seq;
  }

  void sleep_on(int64_t r, uint32_t seq, double t0) {
    uint32_t* flag = word(rank_, 1);
    uint32_t* peer = word(r, 0);
    double nap = 1e-3, next_check = t0 + kLivenessS;
    while (true) {
      __atomic_store_n(flag, static_cast<uint32_t>(r + 1), __ATOMIC_SEQ_CST);
      const uint32_t seen = __atomic_load_n(peer, __ATOMIC_SEQ_CST);
      if (reached(seen, seq)) break;
      timespec ts{static_cast<time_t>(nap), static_cast<long>((nap - static_cast<time_t>(nap)) * 1e9)};
      syscall(SYS_futex, peer, FUTEX_WAIT, seen, &ts, nullptr, 0);  // EAGAIN and ETIMEDOUT are normal
      if (reached(__atomic_load_n(peer, __ATOMIC_ACQUIRE), seq)) break;
      const double now = now_s();
      nap = std::min(nap * 2, 0.05);
      if (now >= next_check) {
        next_check = now + kLivenessS;
        const int64_t p = pid(r);
        if (!alive(p)) {
          __atomic_store_n(flag, 0u, __ATOMIC_SEQ_CST);
          TORCH_CHECK(false, "tpserve-shm: tp rank ", r, " (pid ", p, ") exited during a collective");
        }
        if (now - t0 > timeout_s_) {
          __atomic_store_n(flag, 0u, __ATOMIC_SEQ_CST);
          TORCH_CHECK(false, "tpserve-shm: tp rank ", r, " (pid ", p, ") did not reach collective ", seq,
                      " within ", timeout_s_, " s (hung or stopped)");
        }
      }
    }
    __atomic_store_n(flag, 0u, __ATOMIC_SEQ_CST);
  }

  at::Tensor state_;
  char* base_ = nullptr;
  int64_t rank_ = 0, size_ = 1, slot_bytes_ = 0;
  double timeout_s_ = 0, wait_s_ = 0;
  uint32_t seq_ = 0, all_seen_ = 0;
};

}  // namespace tpserve_shm
