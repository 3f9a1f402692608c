// lorakit's C++ shim over libtorch for what tch does not expose.
//
// Compiled by crates/lora-sdxl/build.rs against the same libtorch headers
// torch-sys uses. Tensors cross the boundary as `at::Tensor*` (tch's
// `C_tensor`): pointers we receive are borrowed; pointers we hand out are
// `new at::Tensor` owned by the receiver. Every entry point catches C++
// exceptions and returns them as a message (nullptr = success).
//
// Optimizer helpers (`lorakit_fused_adamw`, `lorakit_clip_grad_norm`,
// `lorakit_clear_grads`): libtorch's fused AdamW kernel, multi-tensor norm
// and scaling, and `grad = None`, so an optimizer step over hundreds of LoRA
// tensors is a few kernels instead of thousands.
//
// Gradient checkpointing (`lorakit_checkpoint`): a custom autograd Function
// whose forward runs a callback with gradients off (activations are not
// kept) and whose backward re-runs it with gradients on and back-propagates
// through the recomputation — the "reentrant" checkpoint of
// torch.utils.checkpoint. Parameters used inside the callback receive their
// gradients from that nested backward. The RNG state of the inputs' device
// is saved and restored so dropout masks are the same in both runs.

#include <ATen/ATen.h>
#include <ATen/ops/_foreach_mul.h>
#include <ATen/ops/_foreach_norm.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/core/Generator.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "errors.h"

extern "C" {
// Runs the checkpointed computation: `inputs` (n borrowed pointers) → writes
// one owned output pointer to `*out`. Returns 0 on success.
typedef int (*lorakit_fn)(void* data, at::Tensor** inputs, int64_t n, at::Tensor** out);
}

namespace {

using lorakit::error_copy;

at::Tensor call(lorakit_fn fn, void* data, const std::vector<at::Tensor>& inputs) {
  std::vector<at::Tensor*> ptrs;
  ptrs.reserve(inputs.size());
  for (auto& t : inputs) ptrs.push_back(const_cast<at::Tensor*>(&t));
  at::Tensor* out = nullptr;
  int rc = fn(data, ptrs.data(), static_cast<int64_t>(ptrs.size()), &out);
  if (rc != 0 || out == nullptr) {
    throw std::runtime_error("lorakit: the checkpointed computation failed (see the log)");
  }
  at::Tensor result = *out;
  delete out;
  return result;
}

at::Generator generator_for(const at::Device& d) {
  if (d.is_cuda()) return at::globalContext().defaultGenerator(d);
  return at::detail::getDefaultCPUGenerator();
}

struct Checkpoint : public torch::autograd::Function<Checkpoint> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                at::TensorList inputs, int64_t fn, int64_t data) {
    std::vector<at::Tensor> in(inputs.begin(), inputs.end());
    at::Device device = in.empty() ? at::Device(at::kCPU) : in[0].device();
    at::Generator gen = generator_for(device);
    at::Tensor rng;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng = gen.get_state();
    }
    ctx->saved_data["fn"] = fn;
    ctx->saved_data["data"] = data;
    ctx->saved_data["rng"] = rng;
    ctx->save_for_backward(in);
    at::Tensor out = call(reinterpret_cast<lorakit_fn>(fn), reinterpret_cast<void*>(data), in);
    return {out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    auto fn = reinterpret_cast<lorakit_fn>(ctx->saved_data["fn"].toInt());
    auto data = reinterpret_cast<void*>(ctx->saved_data["data"].toInt());
    std::vector<at::Tensor> detached;
    detached.reserve(saved.size());
    for (auto& t : saved) {
      at::Tensor d = t.detach();
      if (t.requires_grad() && at::isFloatingType(t.scalar_type())) d.requires_grad_(true);
      detached.push_back(d);
    }
    at::Device device = saved.empty() ? at::Device(at::kCPU) : saved[0].device();
    at::Generator gen = generator_for(device);
    at::Tensor current;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      current = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    at::Tensor out;
    {
      at::AutoGradMode enable(true);
      out = call(fn, data, detached);
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(current);
    }
    if (out.requires_grad() && grad_out.size() == 1 && grad_out[0].defined()) {
      torch::autograd::backward({out}, {grad_out[0]});
    }
    torch::autograd::variable_list grads;
    for (auto& d : detached) grads.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    grads.push_back(at::Tensor());  // fn
    grads.push_back(at::Tensor());  // data
    return grads;
  }
};

}  // namespace

extern "C" {

// `out = fn(inputs)` with activations recomputed in backward (see above).
// When gradients are off this is a plain call. Returns nullptr or an error
// message to free with `lorakit_free`.
char* lorakit_checkpoint(lorakit_fn fn, void* data, at::Tensor** inputs, int64_t n,
                         at::Tensor** out) {
  try {
    std::vector<at::Tensor> in;
    in.reserve(n);
    for (int64_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    at::Tensor result;
    if (!at::GradMode::is_enabled()) {
      result = call(fn, data, in);
    } else {
      auto outs = Checkpoint::apply(at::TensorList(in), reinterpret_cast<int64_t>(fn),
                                    reinterpret_cast<int64_t>(data));
      result = outs[0];
    }
    *out = new at::Tensor(result);
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

void lorakit_free(char* p) { std::free(p); }

namespace {
std::vector<at::Tensor> gather(at::Tensor** ts, int64_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int64_t i = 0; i < n; ++i) out.push_back(*ts[i]);
  return out;
}
}  // namespace

// One AdamW step (torch.optim.AdamW(fused=True) semantics) over `n`
// parameters with defined gradients, at optimizer step `step` (1-based).
char* lorakit_fused_adamw(at::Tensor** params, at::Tensor** exp_avgs, at::Tensor** exp_avg_sqs,
                          int64_t n, double step, double lr, double beta1, double beta2,
                          double weight_decay, double eps) {
  try {
    at::NoGradGuard no_grad;
    auto p = gather(params, n);
    std::vector<at::Tensor> g;
    g.reserve(n);
    for (auto& t : p) g.push_back(t.grad());
    auto m = gather(exp_avgs, n);
    auto v = gather(exp_avg_sqs, n);
    // The kernel only reads the step count: one scalar serves every parameter.
    at::Tensor st = at::full({}, step, p[0].options().dtype(at::kFloat));
    std::vector<at::Tensor> steps(n, st);
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

// Scales the gradients of `n` parameters (all with defined gradients) so
// their global L2 norm is at most `max_norm`; writes the norm before
// clipping (a 0-dim fp32 tensor, on the gradients' device) to `*total`.
char* lorakit_clip_grad_norm(at::Tensor** params, int64_t n, double max_norm, at::Tensor** total) {
  try {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> g;
    g.reserve(n);
    for (int64_t i = 0; i < n; ++i) g.push_back(params[i]->grad());
    auto norms = at::_foreach_norm(g, 2);
    at::Tensor t = at::stack(norms).to(at::kFloat).norm();
    at::Tensor coef = (max_norm / (t + 1e-6)).clamp_max(1.0);
    at::_foreach_mul_(g, coef);
    *total = new at::Tensor(t);
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

// `p.grad = None` for `n` parameters (the next backward allocates fresh
// gradients instead of accumulating into zeroed ones).
void lorakit_clear_grads(at::Tensor** params, int64_t n) {
  for (int64_t i = 0; i < n; ++i) params[i]->mutable_grad().reset();
}

}  // extern "C"
