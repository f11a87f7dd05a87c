// Hierarchical decoding (docs/MATH.md §4.3): the CPU implementation of decode (schema and contract in
// csrc/ops.cpp). Float inputs score the paths' shared prefixes row by row over a block of pixels (the
// walk table turned into root-to-leaf paths first); float64 (and every dtype with HSS_CPU_PIXEL_PATH=1)
// runs decode_math.h's walks, the CUDA kernels' arithmetic: with HSS_CPU_PIXEL_PATH=1, logits the CUDA
// lanes kernel would read 16 bytes at a time (decode_math::lanes_layout) take the lanes' walk here too,
// V = 16 / sizeof(T) pixels at a time (decode_lanes), and so do float types with size= (decode_up_lanes, G
// destination pixels of a row interpolated together), the others the one-pixel walk.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <map>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "decode_math.h"
#include "loop.h"
#include "vmath.h"

namespace hss {
namespace {

using cpu::kBlock;

// The paths' shared prefixes, built once per call from path_nodes: prefix i extends prefix parent[i]
// (-1: none) by channel node[i], and parent[i] < i, so one pass in index order scores every prefix
// from its parent's score. In a tree every node is one prefix, so each node's activation is computed
// and added once per pixel however many leaves lie below it, and a leaf's score is the sum along its
// path root side first, as decode_math sums (leaves with equal activations on equal paths tie exactly).
struct Prefixes {
  std::vector<int32_t> parent, node;
  std::vector<int32_t> last, len;  // per leaf: its path's prefix (-1 for an empty path) and length
};

Prefixes prefixes(const int32_t* path, int64_t L, int64_t D, int64_t C) {
  Prefixes t;
  std::map<std::pair<int32_t, int32_t>, int32_t> ids;
  for (int64_t l = 0; l < L; ++l) {
    int32_t cur = -1, len = 0;
    for (int64_t d = 0; d < D; ++d) {
      const int32_t node = path[l * D + d];
      if (node < 0 || node >= C) break;  // -1: past the leaf's depth
      auto it = ids.find({cur, node});
      if (it == ids.end()) {
        it = ids.emplace(std::make_pair(cur, node), static_cast<int32_t>(t.node.size())).first;
        t.parent.push_back(cur);
        t.node.push_back(node);
      }
      cur = it->second;
      ++len;
    }
    t.last.push_back(cur);
    t.len.push_back(len);
  }
  return t;
}

// exp for the activations: cpu::vexp, but exactly 0 where the true value is below the smallest normal
// float (vexp would give 2^-126), so that saturated logits give the exact 0 that ties need.
__attribute__((always_inline)) inline float act_exp(float v) { return v < -87.0f ? 0.0f : cpu::vexp(v); }

// One block of float pixels, pixels innermost in every loop (channel c of lane p at x[c * ld + p]),
// compiled for each vector width (see HSS_LANES_TARGETS): the activations, the prefix scores row by
// row, then the first maximum over the leaves' rows. Lanes past n compute on whatever the rows hold
// and are not written. `rows` is scratch for one row per prefix. Softmax: the scores are sums of
// exp(x - max) without the division by the pixel's sum, a positive factor common to all of a pixel's
// paths that cannot change the argmax (beyond rounding).
HSS_LANES_TARGETS void decode_block_f32(const float* x, int64_t ld, int64_t C, int64_t act, int64_t score,
                                        const Prefixes& t, float* rows, int64_t* y, int64_t n, int64_t ignore_index) {
  using A = float;
  alignas(64) A m[kBlock];
  alignas(64) int32_t nan[kBlock];  // a NaN among the lane's logits: every prefix's node is read once
  for (int64_t p = 0; p < kBlock; ++p) nan[p] = 0;
  if (act == decode_math::kSoftmax) {
    for (int64_t p = 0; p < kBlock; ++p) m[p] = x[p];
    for (int64_t c = 1; c < C; ++c) {
      const A* xc = x + c * ld;
      for (int64_t p = 0; p < kBlock; ++p) m[p] = xc[p] > m[p] ? xc[p] : m[p];
    }
  }
  const int64_t np = static_cast<int64_t>(t.node.size());
  for (int64_t i = 0; i < np; ++i) {
    const A* xc = x + t.node[i] * ld;
    A* s = rows + i * kBlock;
    alignas(64) A par[kBlock];
    if (t.parent[i] < 0)
      for (int64_t p = 0; p < kBlock; ++p) par[p] = A(0);
    else
      for (int64_t p = 0; p < kBlock; ++p) par[p] = rows[t.parent[i] * kBlock + p];
    // One loop per activation: no branch on `act` (or on the sign) per element.
    if (act == decode_math::kSigmoid) {
      for (int64_t p = 0; p < kBlock; ++p) {
        const A v = xc[p];
        const bool pos = v >= A(0);
        const A e = act_exp(pos ? -v : v);
        s[p] = par[p] + (pos ? A(1) : e) / (A(1) + e);
        nan[p] |= v != v;
      }
    } else if (act == decode_math::kSoftmax) {
      for (int64_t p = 0; p < kBlock; ++p) {
        s[p] = par[p] + act_exp(xc[p] - m[p]);
        nan[p] |= xc[p] != xc[p];
      }
    } else {
      for (int64_t p = 0; p < kBlock; ++p) {
        s[p] = par[p] + xc[p];
        nan[p] |= xc[p] != xc[p];
      }
    }
  }
  alignas(64) A best[kBlock], cand[kBlock];
  alignas(64) int32_t arg[kBlock];
  const int64_t L = static_cast<int64_t>(t.last.size());
  for (int64_t l = 0; l < L; ++l) {
    const int32_t i = t.last[l];
    if (i < 0) {
      for (int64_t p = 0; p < kBlock; ++p) cand[p] = A(0);
    } else if (score == decode_math::kMean) {
      const A len = static_cast<A>(t.len[l]);
      for (int64_t p = 0; p < kBlock; ++p) cand[p] = rows[i * kBlock + p] / len;
    } else {
      for (int64_t p = 0; p < kBlock; ++p) cand[p] = rows[i * kBlock + p];
    }
    if (l == 0) {
      for (int64_t p = 0; p < kBlock; ++p) {
        best[p] = cand[p];
        arg[p] = 0;
      }
      continue;
    }
    const int32_t li = static_cast<int32_t>(l);
    for (int64_t p = 0; p < kBlock; ++p) {
      const bool better = cand[p] > best[p];  // strict: an earlier (lower) leaf keeps a tie
      best[p] = better ? cand[p] : best[p];
      arg[p] = better ? li : arg[p];
    }
  }
  for (int64_t p = 0; p < n; ++p) y[p] = nan[p] ? ignore_index : arg[p];
}

// The walk table (3, V) checked (the CPU can read it, unlike the CUDA host): channels in [0, C), depths
// in [1, kMaxDepth], a pre-order (a node at depth d > 1 follows its parent, the last internal node at
// depth d - 1 still open), the leaf ids a permutation of 0..L-1, increasing along the walk if `ordered`
// says so. Returns the leaves' root-to-leaf paths, the (L, D) table `prefixes` reads (-1 past a leaf's
// depth), with L and D.
std::vector<int32_t> walk_paths(const int32_t* walk, int64_t V, int64_t C, bool ordered, int64_t& L, int64_t& D) {
  L = 0;
  D = 1;
  for (int64_t i = 0; i < V; ++i) {
    TORCH_CHECK(walk[i] >= 0 && walk[i] < C, "decode: walk channel ", walk[i], " at position ", i,
                " is outside [0, ", C, ")");
    TORCH_CHECK(walk[V + i] >= 1 && walk[V + i] <= kMaxDepth, "decode: walk depth ", walk[V + i], " at position ",
                i, " is outside [1, ", kMaxDepth, "]");
    L += walk[2 * V + i] >= 0;
    D = std::max<int64_t>(D, walk[V + i]);
  }
  std::vector<int32_t> paths(L * D, -1), chain(kMaxDepth + 1, -1);
  std::vector<char> seen(L, 0);
  int32_t open = 0, last = -1;  // the depth of the deepest open internal node; the last leaf id met
  for (int64_t i = 0; i < V; ++i) {
    const int32_t c = walk[i], d = walk[V + i], l = walk[2 * V + i];
    TORCH_CHECK(d <= open + 1, "decode: walk position ", i, " at depth ", d, " has no parent (not a pre-order)");
    chain[d] = c;
    open = l < 0 ? d : d - 1;
    if (l < 0) continue;
    TORCH_CHECK(l < L && !seen[l], "decode: walk leaf ids must be 0..", L - 1, " once each, got ", l,
                " at position ", i);
    TORCH_CHECK(!ordered || l > last, "decode: the walk is said ordered but leaf ", l, " follows leaf ", last);
    seen[l] = 1;
    last = l;
    for (int32_t k = 1; k <= d; ++k) paths[l * D + k - 1] = chain[k];
  }
  return paths;
}


// HSS_CPU_PIXEL_PATH=1 on logits that decode_math::lanes_layout accepts: the CUDA lanes kernel's walk
// (decode_math.h's walk_step_lanes), V pixels at a time over lanes q0 .. q0 + n - 1 of a tile; lanes past
// n (the block's last group) read 0 and are not written. Walk offsets are channels here.
template <int V>
struct TileLanes {
  const float* p;
  int64_t ld;
  int n;
  void load(int64_t c, float (&z)[V]) const {
    for (int k = 0; k < V; ++k) z[k] = k < n ? p[c * ld + k] : 0.f;
  }
};

template <int V>
struct LocalRunLanes {
  float (*s)[V];  // kMaxDepth + 1 rows, row 0 zeros
  void load(int32_t d, float (&v)[V]) const {
    for (int k = 0; k < V; ++k) v[k] = s[d][k];
  }
  void store(int32_t d, const float (&v)[V]) const {
    for (int k = 0; k < V; ++k) s[d][k] = v[k];
  }
};

// The lanes' walk over the C nodes (decode_math.h): their softmax shifts m (walk offsets c * stride), then one
// walk_step_lanes per node, lanes.load(nodes[i].x, z) its logits; the best leaves into best.
template <int V, typename X>
void walk_lanes(const X& lanes, int64_t C, int64_t stride, const decode_math::WalkNode* nodes, bool ordered,
                int64_t act, int64_t score, float (&m)[V], decode_math::LaneBest<float, V>& best) {
  float run[kMaxDepth + 1][V] = {};
  decode_math::softmax_max_lanes<V>(lanes, C, stride, act, m);
  decode_math::lanes_start(best);
  for (int64_t i = 0; i < C; ++i) {
    float xv[V];
    lanes.load(nodes[i].x, xv);
    decode_math::walk_step_lanes<V>(xv, nodes[i], LocalRunLanes<V>{run}, act, m, score, ordered, best);
  }
}

template <int V>
void decode_lanes(const float* x, int64_t ld, int64_t n, int64_t C, const decode_math::WalkNode* nodes, bool ordered,
                  int64_t act, int64_t score, int64_t ignore_index, int64_t* y) {
  for (int64_t q0 = 0; q0 < n; q0 += V) {
    const TileLanes<V> lanes{x + q0, ld, static_cast<int>(std::min<int64_t>(V, n - q0))};
    float m[V];
    decode_math::LaneBest<float, V> best;
    walk_lanes<V>(lanes, C, 1, nodes, ordered, act, score, m, best);
    for (int k = 0; k < lanes.n; ++k) y[q0 + k] = decode_math::lane_label(best, m, act, k, ignore_index);
  }
}

// HSS_CPU_PIXEL_PATH=1 with size= and float types: what the CUDA decode_up_lanes_kernel runs, G = 16 / sizeof(T)
// destination pixels of a row per group from the row's start, each node's logits interpolated for the G through
// UpLanes (nodes[i].x: the channel times sC), the lanes' walk. A group the block shares with its neighbour runs
// whole, its lanes outside the block not written (each lane's label is its own). Labels of pixels i0 .. i0 + n - 1
// into y[i0 + p].
template <typename T>
void decode_up_lanes(const T* x, int64_t sC, const UpsampleGeom<float>& u, int64_t i0, int64_t n, int64_t C,
                     const decode_math::WalkNode* nodes, bool ordered, int64_t act, int64_t score,
                     int64_t ignore_index, int64_t* y) {
  constexpr int G = static_cast<int>(16 / sizeof(T));
  for (int64_t p = 0; p < n;) {
    const int64_t q = i0 + p, rr = q / u.W, X = q - rr * u.W, X0 = X / G * G;
    const int64_t gn = std::min<int64_t>(G, u.W - X0);      // the group's pixels
    const int64_t m = std::min<int64_t>(X0 + gn - X, n - p);  // those in the block, from X
    float mx[G];
    decode_math::LaneBest<float, G> best;
    walk_lanes<G>(UpLanesAt<T, float, G>{up_lanes<T, float, G>(x, sC, u, rr, X0, gn)}, C, sC, nodes, ordered, act,
                  score, mx, best);
    for (int64_t j = 0; j < m; ++j)
      y[q + j] = decode_math::lane_label(best, mx, act, static_cast<int>(X - X0 + j), ignore_index);
    p += m;
  }
}

template <typename scalar_t>
void decode_cpu_loop(const at::Tensor& logits, const at::Tensor& walk, bool ordered, int64_t act, int64_t score,
                     at::Tensor& out, bool upsample, bool align_corners, int64_t ignore_index) {
  using A = at::opmath_type<scalar_t>;  // float for half/bfloat16/float, double for double
  const int64_t C = logits.size(1);
  constexpr bool vec = std::is_same_v<A, float>;
  const bool forced = cpu::pixel_path_forced();
  const bool lanes = vec && !forced;
  // the CUDA lanes kernel's walk (HSS_CPU_PIXEL_PATH=1, no size=, a layout it reads 16 bytes at a time)
  const bool walk_lanes = vec && forced && !upsample &&
                          decode_math::lanes_layout(logits.sizes().data(), logits.strides().data(),
                                                    logits.element_size(), logits.data_ptr());
  const int32_t* w = walk.data_ptr<int32_t>();
  int64_t L = 0, D = 0;
  const std::vector<int32_t> paths = walk_paths(w, C, C, ordered, L, D);
  const Prefixes t = lanes ? prefixes(paths.data(), L, D, C) : Prefixes{};
  // the CUDA fused-upsampling lanes kernel's walk (HSS_CPU_PIXEL_PATH=1, size=)
  const bool walk_up_lanes = vec && forced && upsample;
  std::vector<decode_math::WalkNode> nodes;  // the per-pixel walk, x = the channel (the up lanes': times sC)
  if (!lanes)
    for (int64_t i = 0; i < C; ++i)
      nodes.push_back(decode_math::walk_node(w, C, i, C, walk_up_lanes ? logits.stride(1) : 1));
  const PixelGeom g = upsample ? geom(out) : geom(logits);
  std::optional<cpu::Upsample<A>> up;
  if (upsample) up.emplace(logits.sizes().data(), logits.strides().data(), out.size(1), out.size(2), align_corners);
  int64_t* y = out.data_ptr<int64_t>();
  const int64_t rows = lanes ? std::max<int64_t>(1, static_cast<int64_t>(t.node.size())) * kBlock : 0;
  cpu::for_each_block_direct<scalar_t, A>(
      logits.data_ptr<scalar_t>(), C, logits.stride(1), g, out.numel(), rows,
      [&](int64_t i0, int64_t n, const int64_t*, const A* x, int64_t ld, A* scratch) {
        if constexpr (vec) {
          if (lanes) {
            decode_block_f32(x, ld, C, act, score, t, scratch, y + i0, n, ignore_index);
            return;
          }
          if (walk_up_lanes) {
            decode_up_lanes<scalar_t>(logits.data_ptr<scalar_t>(), logits.stride(1), up->geom, i0, n, C, nodes.data(),
                                      ordered, act, score, ignore_index, y);
            return;
          }
          if (walk_lanes) {
            constexpr int V = static_cast<int>(16 / sizeof(scalar_t));
            decode_lanes<V>(x, ld, n, C, nodes.data(), ordered, act, score, ignore_index, y + i0);
            return;
          }
        }
        // float64 (or HSS_CPU_PIXEL_PATH=1): decode_math's per-pixel walk, the CUDA one-pixel kernel's
        if (up && forced)  // the CUDA kernel's reads: four source values per channel
          for (int64_t p = 0; p < n; ++p)
            y[i0 + p] = decode_math::decode_pixel<A>(
                bilinear_col<scalar_t, A>(logits.data_ptr<scalar_t>(), logits.stride(1), up->geom.stencil(i0 + p)), C,
                nodes.data(), C, ordered, act, score, ignore_index);
        else
          for (int64_t p = 0; p < n; ++p)
            y[i0 + p] = decode_math::decode_pixel<A>(cpu::StridedColumn<A>{x + p, ld}, C, nodes.data(), C, ordered,
                                                     act, score, ignore_index);
      }, up ? &*up : nullptr);
}

at::Tensor decode_cpu(const at::Tensor& logits, const at::Tensor& walk, bool ordered, int64_t activation,
                      int64_t score, at::IntArrayRef size, bool align_corners, int64_t ignore_index) {
  check_decode("decode", logits, walk, size);
  const bool upsample = !size.empty();
  auto out = at::empty({logits.size(0), upsample ? size[0] : logits.size(2), upsample ? size[1] : logits.size(3)},
                       logits.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "hss_kernels::decode", [&] {
    decode_cpu_loop<scalar_t>(logits, walk, ordered, activation, score, out, upsample, align_corners, ignore_index);
  });
  return out;
}

}  // namespace
}  // namespace hss

TORCH_LIBRARY_IMPL(hss_kernels, CPU, m) {
  m.impl("decode", &hss::decode_cpu);
}
