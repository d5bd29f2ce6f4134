// The eager CUDA fast path of QLoRALinear: op `_linear`, y = x·wᵀ + s·dropout(x)·lora_Aᵀ·lora_Bᵀ + bias, with its
// autograd in C++. The layer calls it once per forward; its backward is a C++ autograd node that calls the
// backward op of the path chosen at forward time, so no Python runs in backward. The custom op
// qlora_ext::qlora_linear (qlora_ext/ops.py) calls the same path ops: one implementation per path.
//
// Also here: the table of GEMM paths (`_path_names`) and the fused path's backward op `_fused_bwd`.
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "path_ops.h"

namespace qlora_ext {
namespace {

// The GEMM paths, in the order of qlora_ext.policy.PATHS (qlora_ext/backends/cuda.py checks it against
// `_path_names` at import): the index is the path id Python passes to `_linear`. A path is one line, its ops looked
// up by schema name; bwd nullptr: forward only (the policy gives its calls another path's backward).
struct Path {
  const char* name;
  const char* fwd;  // signature PathFwdFn
  const char* bwd;  // signature PathBwdFn, or nullptr
};
constexpr Path kPaths[] = {
    {"fused", "qlora_ext::_fused_fwd", "qlora_ext::_fused_bwd"},
    {"decode_gemm", "qlora_ext::_decode_gemm_fwd", "qlora_ext::_decode_gemm_bwd"},
    {"gemv", "qlora_ext::_gemv_fwd", nullptr},
    {"sm90", "qlora_ext::_sm90_fwd", nullptr},  // a kernel only in 9.0a builds; policy.supports says when
};
constexpr int64_t kNumPaths = static_cast<int64_t>(std::size(kPaths));

std::vector<std::string> path_names() {
  std::vector<std::string> names;
  for (const Path& path : kPaths) names.emplace_back(path.name);
  return names;
}

// Handles looked up on the first call (every op is registered by then), reused by every later one.
struct PathHandles {
  std::vector<c10::TypedOperatorHandle<PathFwdFn>> fwd;
  std::vector<std::optional<c10::TypedOperatorHandle<PathBwdFn>>> bwd;
};

const PathHandles& path_handles() {
  static const PathHandles handles = [] {
    PathHandles h;
    for (const Path& path : kPaths) {
      h.fwd.push_back(find_op<PathFwdFn>(path.fwd));
      h.bwd.push_back(path.bwd ? std::optional(find_op<PathBwdFn>(path.bwd)) : std::nullopt);
    }
    return h;
  }();
  return handles;
}

void check_paths(int64_t fwd_path, int64_t bwd_path) {
  constexpr const char* kOp = "qlora_linear";
  TORCH_CHECK(fwd_path >= 0 && fwd_path < kNumPaths, kOp, ": fwd_path must index qlora_ext.policy.PATHS (0 <= ",
              "fwd_path < ", kNumPaths, "), got ", fwd_path);
  TORCH_CHECK(bwd_path >= 0 && bwd_path < kNumPaths, kOp, ": bwd_path must index qlora_ext.policy.PATHS (0 <= ",
              "bwd_path < ", kNumPaths, "), got ", bwd_path);
  TORCH_CHECK(kPaths[bwd_path].bwd != nullptr, kOp, ": bwd_path ", bwd_path, " (\"", kPaths[bwd_path].name,
              "\") is forward-only; pass a path with a backward op");
}

// (y, u) from the forward op of fwd_path; x, lora_A, lora_B made contiguous as the path ops take them. bwd_path is
// checked here too, so that a bad one fails at the forward rather than in the backward.
std::tuple<at::Tensor, at::Tensor> path_forward(const at::Tensor& x, const OptionalTensorList& w,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                const std::optional<at::Tensor>& bias, double scaling,
                                                double dropout_p, int64_t seed, int64_t fwd_path, int64_t bwd_path) {
  check_paths(fwd_path, bwd_path);
  const KernelScope scope;
  return path_handles().fwd[fwd_path].call(x.contiguous(), w, lora_A.contiguous(), lora_B.contiguous(), bias,
                                           scaling, dropout_p, seed);
}

// Op qlora_ext::_fused_bwd -> (dx, dA, dB) in two launches: dx and g = s·dy·lora_B from _fused_bwd_dx, then dA and
// dB from _bwd_ab.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                         const at::Tensor& u, const OptionalTensorList& w,
                                                         const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                         double scaling, double dropout_p, int64_t seed) {
  static const auto bwd_dx =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const OptionalTensorList&, const at::Tensor&,
                                                 const at::Tensor&, double, double, int64_t)>(
          "qlora_ext::_fused_bwd_dx");
  static const auto bwd_ab =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, double, double, int64_t)>("qlora_ext::_bwd_ab");
  const KernelScope scope;
  auto [dx, g] = bwd_dx.call(dy, w, lora_A, lora_B, scaling, dropout_p, seed);
  auto [dA, dB] = bwd_ab.call(dy, x, u, g, scaling, dropout_p, seed);
  return {dx, dA, dB};
}

// Op qlora_ext::_linear below autograd (inference mode, or a caller that excluded autograd): y alone.
at::Tensor linear_forward(const at::Tensor& x, const OptionalTensorList& w, const at::Tensor& lora_A,
                          const at::Tensor& lora_B, const std::optional<at::Tensor>& bias, double scaling,
                          double dropout_p, int64_t seed, int64_t fwd_path, int64_t bwd_path) {
  return std::get<0>(path_forward(x, w, lora_A, lora_B, bias, scaling, dropout_p, seed, fwd_path, bwd_path));
}

}  // namespace

// The autograd node of _linear. Differentiable inputs: x, lora_A, lora_B, bias (w is frozen; u is saved, never
// differentiated). Its output edges are the inputs that are tensors, in order: x 0, lora_A 1, lora_B 2, bias 3
// (only when a bias is given); needs_input_grad takes those indices.
class QLoRALinearFunction : public torch::autograd::Function<QLoRALinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const OptionalTensorList& w,
                            const at::Tensor& lora_A, const at::Tensor& lora_B, const std::optional<at::Tensor>& bias,
                            double scaling, double dropout_p, int64_t seed, int64_t fwd_path, int64_t bwd_path) {
    const at::Tensor A = lora_A.contiguous(), B = lora_B.contiguous();
    auto [y, u] = path_forward(x, w, A, B, bias, scaling, dropout_p, seed, fwd_path, bwd_path);
    // x as given, as the custom op saves it: a non-contiguous x is copied again in backward rather than its copy
    // being held from forward to backward.
    torch::autograd::variable_list saved = {x, u, A, B};
    for (const std::optional<at::Tensor>& t : w) saved.push_back(t.has_value() ? *t : at::Tensor());
    ctx->save_for_backward(std::move(saved));
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["bwd_path"] = bwd_path;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const torch::autograd::variable_list saved = ctx->get_saved_variables();
    OptionalTensorList w;
    for (size_t i = 4; i < saved.size(); ++i) {
      w.push_back(saved[i].defined() ? std::optional<at::Tensor>(saved[i]) : std::nullopt);
    }
    const at::Tensor& dy = grads[0];
    const at::Tensor& x = saved[0];
    const KernelScope scope;
    auto [dx, dA, dB] = (*path_handles().bwd[ctx->saved_data["bwd_path"].toInt()])
                            .call(dy.contiguous(), x.contiguous(), saved[1], w, saved[2], saved[3],
                                  ctx->saved_data["scaling"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                                  ctx->saved_data["seed"].toInt());
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // One gradient per forward argument; none for the non-tensor ones and for inputs this backward does not need.
    return {ctx->needs_input_grad(0) ? dx : at::Tensor(),
            at::Tensor(),
            ctx->needs_input_grad(1) ? dA : at::Tensor(),
            ctx->needs_input_grad(2) ? dB : at::Tensor(),
            has_bias && ctx->needs_input_grad(3) ? dy.sum(0) : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

// Op qlora_ext::_linear with autograd: the graph gets one C++ node (QLoRALinearFunction).
at::Tensor linear_autograd(const at::Tensor& x, const OptionalTensorList& w, const at::Tensor& lora_A,
                           const at::Tensor& lora_B, const std::optional<at::Tensor>& bias, double scaling,
                           double dropout_p, int64_t seed, int64_t fwd_path, int64_t bwd_path) {
  return QLoRALinearFunction::apply(x, w, lora_A, lora_B, bias, scaling, dropout_p, seed, fwd_path, bwd_path);
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("_fused_bwd", &qlora_ext::fused_bwd);
  m.impl("_linear", &qlora_ext::linear_forward);
}

TORCH_LIBRARY_IMPL(qlora_ext, Autograd, m) { m.impl("_linear", &qlora_ext::linear_autograd); }

// No tensor arguments: CompositeExplicitAutograd is the kernel the dispatcher runs for such ops.
TORCH_LIBRARY_IMPL(qlora_ext, CompositeExplicitAutograd, m) { m.impl("_path_names", &qlora_ext::path_names); }
