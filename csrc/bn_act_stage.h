// bn_act_stage's body, shared with conv_bn_act_stage: act(batch_norm(input) (+ residual)) with nn.BatchNorm2d's
// training / eval semantics (running statistics updated in place in training), checks first; `op` and `of` name
// the calling op and what `input` is in its error messages; batch_mean / batch_var (training): input's batch
// statistics, taken by its producer (conv_genstats).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string_view>

namespace resnet_fused {

at::Tensor bn_act_stage(const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                        const std::optional<at::Tensor>& residual, bool training, std::optional<double> momentum,
                        const std::optional<at::Tensor>& momentum_tensor, double eps, std::string_view act, double alpha,
                        const std::optional<at::Tensor>& num_batches_tracked, const char* op, const char* of,
                        const std::optional<at::Tensor>& batch_mean = std::nullopt,
                        const std::optional<at::Tensor>& batch_var = std::nullopt);

}  // namespace resnet_fused
