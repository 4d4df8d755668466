// Host tests of moe/moe_permute.h, the permutation the CPU and CUDA MoE
// kernels share: against a naive stable sort, for int32 and int64 ids, with
// chunks processed in any order (as threads would), empty experts, all slots
// on one expert, and ids outside [0, E) that must be skipped, counted and
// never used to write.
#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "moe/moe_permute.h"
#include "tests/check.h"

using namespace m1::moe;

namespace {

struct Result {
  std::vector<int32_t> sorted, pos, offsets;
  int64_t invalid = 0;
};

// The three passes, chunks visited in `order` (a permutation of the chunks).
template <typename Id>
Result run(const std::vector<Id>& ids, int64_t experts, const std::vector<int64_t>& order) {
  const int64_t slots = int64_t(ids.size()), chunks = permute_chunks(slots);
  std::vector<int32_t> table(static_cast<size_t>(experts * chunks), -7);  // garbage: pass 1 must overwrite
  Result r;
  for (int64_t c : order) r.invalid += histogram_chunk(ids.data(), slots, experts, chunks, c, table.data());
  const int64_t total = exclusive_scan(table.data(), experts * chunks);
  r.offsets.assign(size_t(experts + 1), -1);
  expert_offsets_from_cursor(table.data(), experts, chunks, total, r.offsets.data());
  // One guard element on each side: nothing may be written outside [0, slots).
  std::vector<int32_t> sorted(static_cast<size_t>(slots + 2), -1), pos(static_cast<size_t>(slots + 2), -1);
  for (int64_t c : order) scatter_chunk(ids.data(), slots, experts, chunks, c, table.data(), sorted.data() + 1, pos.data() + 1);
  M1_EXPECT(sorted.front() == -1 && sorted.back() == -1 && pos.front() == -1 && pos.back() == -1, "guards written");
  r.sorted.assign(sorted.begin() + 1, sorted.end() - 1);
  r.pos.assign(pos.begin() + 1, pos.end() - 1);
  return r;
}

template <typename Id>
void check_case(const std::vector<Id>& ids, int64_t experts, std::mt19937& rng, const char* what) {
  const int64_t slots = int64_t(ids.size()), chunks = permute_chunks(slots);
  std::vector<int64_t> order(static_cast<size_t>(chunks));
  for (int64_t c = 0; c < chunks; ++c) order[size_t(c)] = c;
  const Result a = run(ids, experts, order);
  std::shuffle(order.begin(), order.end(), rng);
  const Result b = run(ids, experts, order);
  M1_EXPECT(a.sorted == b.sorted && a.pos == b.pos && a.offsets == b.offsets, "%s: chunk order changed the result",
            what);

  // Naive reference: a stable sort of the valid slots by expert.
  std::vector<int32_t> valid;
  int64_t invalid = 0;
  for (int64_t s = 0; s < slots; ++s) {
    if (ids[size_t(s)] >= 0 && int64_t(ids[size_t(s)]) < experts) {
      valid.push_back(int32_t(s));
    } else {
      ++invalid;
    }
  }
  std::stable_sort(valid.begin(), valid.end(), [&](int32_t x, int32_t y) { return ids[size_t(x)] < ids[size_t(y)]; });
  M1_EXPECT(a.invalid == invalid, "%s: invalid count %ld, expected %ld", what, long(a.invalid), long(invalid));
  const int64_t n_valid = int64_t(valid.size());
  M1_EXPECT(a.offsets[size_t(experts)] == n_valid, "%s: total %d != %ld", what, a.offsets[size_t(experts)], long(n_valid));
  for (int64_t p = 0; p < n_valid; ++p) {
    M1_EXPECT(a.sorted[size_t(p)] == valid[size_t(p)], "%s: sorted[%ld] = %d, expected %d", what, long(p),
              a.sorted[size_t(p)], valid[size_t(p)]);
    M1_EXPECT(a.pos[size_t(a.sorted[size_t(p)])] == p, "%s: slot_pos is not the inverse at %ld", what, long(p));
  }
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t count = std::count(ids.begin(), ids.end(), Id(e));
    M1_EXPECT(a.offsets[size_t(e + 1)] - a.offsets[size_t(e)] == count, "%s: expert %ld has %d rows, expected %ld",
              what, long(e), a.offsets[size_t(e + 1)] - a.offsets[size_t(e)], long(count));
    for (int64_t p = a.offsets[size_t(e)]; p < a.offsets[size_t(e + 1)]; ++p)
      M1_EXPECT(ids[size_t(a.sorted[size_t(p)])] == Id(e), "%s: position %ld not expert %ld", what, long(p), long(e));
  }
  // Skipped slots keep whatever slot_pos held (the guard value here).
  for (int64_t s = 0; s < slots; ++s)
    if (!(ids[size_t(s)] >= 0 && int64_t(ids[size_t(s)]) < experts))
      M1_EXPECT(a.pos[size_t(s)] == -1, "%s: slot_pos written for invalid slot %ld", what, long(s));
  M1_EXPECT(first_invalid_id(ids.data(), slots, experts) ==
                (invalid ? int64_t(std::find_if(ids.begin(), ids.end(), [&](Id v) { return v < 0 || int64_t(v) >= experts; }) - ids.begin()) : -1),
            "%s: first_invalid_id", what);
}

template <typename Id>
void suite(std::mt19937& rng) {
  for (int64_t experts : {1, 3, 8, 32}) {
    for (int64_t slots : {0, 1, 7, 255, 256, 257, 1000, 4096 + 13}) {
      std::uniform_int_distribution<int64_t> pick(0, experts - 1);
      std::vector<Id> ids(static_cast<size_t>(slots));
      for (Id& v : ids) v = Id(pick(rng));
      check_case(ids, experts, rng, "random");
      // Experts that receive nothing: only even ids.
      for (Id& v : ids) v = Id((pick(rng) / 2) * 2);
      check_case(ids, experts, rng, "even experts only");
      // Every slot on the last expert.
      std::fill(ids.begin(), ids.end(), Id(experts - 1));
      check_case(ids, experts, rng, "one expert");
      // Ids outside [0, E): skipped and counted, never written.
      if (slots > 0) {
        for (Id& v : ids) v = Id(pick(rng));
        ids[size_t(slots / 2)] = Id(experts);
        ids[size_t(slots - 1)] = Id(-1);
        if (slots > 3) ids[0] = Id(experts + 1000);
        check_case(ids, experts, rng, "invalid ids");
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  suite<int64_t>(rng);
  suite<int32_t>(rng);
  M1_EXPECT(permute_chunks(0) == 0 && permute_chunks(1) == 1 && permute_chunks(kPermuteChunk) == 1 &&
                permute_chunks(kPermuteChunk + 1) == 2,
            "permute_chunks");
  M1_EXPECT(slot_token(0, 2) == 0 && slot_token(5, 2) == 2 && slot_token(7, 4) == 1, "slot_token");
  M1_TEST_MAIN_END();
}
