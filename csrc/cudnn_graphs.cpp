// The cuDNN graph path's switch, and where this build has no graphs (no cudnn-frontend headers: RF_WITH_CUDNN_FRONTEND
// undefined) every graph entry point's answer "no graph": the callers then run their aten / kernel passes.
#include <atomic>

#include "conv_genstats.h"
#include "cudnn_graphs.h"

namespace resnet_fused {
namespace {
std::atomic<bool> graphs_enabled{false};
}  // namespace

void cudnn_graphs_set_enabled(bool enabled) { graphs_enabled.store(enabled); }
bool cudnn_graphs_enabled() { return graphs_enabled.load(std::memory_order_relaxed); }

#ifndef RF_WITH_CUDNN_FRONTEND
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

bool cudnn_graphs_built() { return false; }
std::vector<std::pair<std::string, std::string>> cudnn_graph_report() { return {}; }
std::optional<std::tuple<Tensor, Tensor, Tensor>> conv_genstats_dgrad_graph(const Tensor&, const Tensor&, const Tensor&,
                                                                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef,
                                                                            const Tensor&, const Tensor&, const OptTensor&,
                                                                            const OptTensor&, double, bool) {
  return std::nullopt;
}
std::optional<Tensor> conv_genstats_wgrad_graph(const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
                                                at::IntArrayRef, const Tensor&, const Tensor&) {
  return std::nullopt;
}
std::optional<Tensor> conv_act_graph(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, at::IntArrayRef,
                                     at::IntArrayRef, at::IntArrayRef, int64_t, Act, double) {
  return std::nullopt;
}
#endif

}  // namespace resnet_fused
