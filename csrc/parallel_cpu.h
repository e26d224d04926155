#pragma once
// Work items of very different lengths (sequences) over ATen's thread pool.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <vector>

// body(item, scratch) for every item in [0, n), longest first (by length(item)) and handed out one
// at a time, so the threads finish together whatever the length mix; make_scratch() builds each
// thread's buffers once.
template <typename Length, typename MakeScratch, typename Body>
void longest_first(int64_t n, Length length, MakeScratch make_scratch, Body body) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length(a) > length(b); });
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next++; i < n; i = next++) body(order[i], scratch);
  });
}
