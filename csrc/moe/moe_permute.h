// Index-only MoE permutation, shared by the CPU and CUDA kernels (and
// unit-tested on the host by csrc/tests/test_moe_permute.cpp).
//
// Slots: token t sends its j-th choice to expert topk_ids[t, j]; the T * k
// (token, choice) pairs are numbered slot = t * k + j. The permutation puts the
// slots in expert order, stably (by slot index, i.e. by token, within an
// expert), so every kernel that walks it is deterministic:
//
//   sorted_slots[p]         slot at expert-sorted position p        [T * k]
//   slot_pos[slot]          its position (the inverse map)          [T * k]
//   expert_offsets[e]       first position of expert e; [E] = T * k [E + 1]
//
// It is a counting sort in chunks of kPermuteChunk slots, three passes that
// parallelise over chunks (CPU threads, CUDA threads) with no atomics:
//
//   1. histogram_chunk: counts[e * C + c] = how many slots of chunk c go to e
//      (C chunks; the table is expert-major so that step 2 is a flat scan);
//   2. exclusive_scan:  cursor[i] = sum of counts[0 .. i), over the flat table:
//      cursor[e * C + c] is where chunk c's first slot of expert e goes;
//   3. scatter_chunk:   walks chunk c in slot order, placing each slot at its
//      expert's cursor and advancing it.
//
// Ids outside [0, E) are never used to address memory: passes 1 and 3 skip
// them and pass 1 reports how many there were. The callers raise an error
// when there is any (before the CPU kernel touches outputs; on CUDA after a
// flag is read back), so skipped slots never reach a GEMM.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace m1::moe {

// Slots per chunk: large enough that the [E, C] count table stays small,
// small enough that a CUDA thread walking one chunk finishes quickly.
constexpr int64_t kPermuteChunk = 256;

M1_HOST_DEVICE M1_INLINE int64_t permute_chunks(int64_t slots) {
  return (slots + kPermuteChunk - 1) / kPermuteChunk;
}

template <typename Id>
M1_HOST_DEVICE M1_INLINE bool valid_expert(Id id, int64_t experts) {
  return id >= 0 && int64_t(id) < experts;
}

// Index of the first id outside [0, experts), or -1 when all are valid.
template <typename Id>
M1_HOST_DEVICE inline int64_t first_invalid_id(const Id* ids, int64_t n, int64_t experts) {
  for (int64_t i = 0; i < n; ++i)
    if (!valid_expert(ids[i], experts)) return i;
  return -1;
}

// Pass 1 for chunk c: writes counts[e * chunks + c] for every expert e and
// returns how many ids of the chunk are outside [0, experts) (not counted).
template <typename Id>
M1_HOST_DEVICE inline int64_t histogram_chunk(const Id* ids, int64_t slots, int64_t experts, int64_t chunks,
                                              int64_t c, int32_t* counts) {
  for (int64_t e = 0; e < experts; ++e) counts[e * chunks + c] = 0;
  const int64_t begin = c * kPermuteChunk;
  const int64_t end = begin + kPermuteChunk < slots ? begin + kPermuteChunk : slots;
  int64_t invalid = 0;
  for (int64_t s = begin; s < end; ++s) {
    const Id e = ids[s];
    if (valid_expert(e, experts)) {
      counts[int64_t(e) * chunks + c] += 1;
    } else {
      ++invalid;
    }
  }
  return invalid;
}

// Pass 2, serial: exclusive prefix sum of n counts in place; returns the total.
M1_HOST_DEVICE inline int64_t exclusive_scan(int32_t* values, int64_t n) {
  int64_t running = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t v = values[i];
    values[i] = int32_t(running);
    running += v;
  }
  return running;
}

// expert_offsets[e] = cursor[e * chunks] (expert e's first position);
// expert_offsets[experts] = total. `cursor` is the scanned table before pass 3.
M1_HOST_DEVICE inline void expert_offsets_from_cursor(const int32_t* cursor, int64_t experts, int64_t chunks,
                                                      int64_t total, int32_t* expert_offsets) {
  for (int64_t e = 0; e < experts; ++e) expert_offsets[e] = chunks > 0 ? cursor[e * chunks] : 0;
  expert_offsets[experts] = int32_t(total);
}

// Pass 3 for chunk c: places each valid slot of the chunk at its expert's
// cursor (advancing cursor[e * chunks + c], which only this chunk touches).
template <typename Id>
M1_HOST_DEVICE inline void scatter_chunk(const Id* ids, int64_t slots, int64_t experts, int64_t chunks, int64_t c,
                                         int32_t* cursor, int32_t* sorted_slots, int32_t* slot_pos) {
  const int64_t begin = c * kPermuteChunk;
  const int64_t end = begin + kPermuteChunk < slots ? begin + kPermuteChunk : slots;
  for (int64_t s = begin; s < end; ++s) {
    const Id e = ids[s];
    if (!valid_expert(e, experts)) continue;
    const int32_t p = cursor[int64_t(e) * chunks + c]++;
    sorted_slots[p] = int32_t(s);
    slot_pos[s] = p;
  }
}

// The token a slot belongs to.
M1_HOST_DEVICE M1_INLINE int64_t slot_token(int64_t slot, int64_t topk) { return slot / topk; }

}  // namespace m1::moe
