// Data-parallel collectives for lorakit (crates/lora-sdxl/src/dist.rs) on
// libtorch's own c10d: a TCPStore rendezvous (torchrun's MASTER_ADDR /
// MASTER_PORT) and a Gloo process group, which reduces CPU tensors and, in
// the CUDA builds of libtorch, CUDA tensors (through host copies).
//
// Why two declarations by mangled name: ProcessGroupGloo.hpp includes gloo's
// own headers, which the libtorch wheel does not ship, so this file cannot
// include it. It needs two entry points of that class, both exported by
// libtorch_cpu.so: `ProcessGroupGloo::Options::create_default(timeout)`
// (the default transport device: GLOO_SOCKET_IFNAME's interfaces, else the
// host name's address, else loopback) and the constructor. They are
// declared below as free functions bound to those symbols (same Itanium
// calling convention: `this` first, non-trivial arguments by address). The
// object is then used only through its base class, c10d::Backend, whose
// header needs no gloo. sizeof(ProcessGroupGloo) is 0x1e8 bytes in torch
// 2.11.0 (the `operator new` before the constructor in its `merge`);
// kGlooObjectBytes leaves eight times that.

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "errors.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

namespace {
using OptionsPtr = c10::intrusive_ptr<c10d::Backend::Options>;
using StorePtr = c10::intrusive_ptr<c10d::Store>;
constexpr size_t kGlooObjectBytes = 4096;

OptionsPtr gloo_default_options(std::chrono::milliseconds timeout) __asm__(
    "_ZN4c10d16ProcessGroupGloo7Options14create_defaultENSt6chrono8durationIlSt5ratioILl1ELl1000EE"
    "EE");
void gloo_construct(void* self, const StorePtr& store, int rank, int size, OptionsPtr options) __asm__(
    "_ZN4c10d16ProcessGroupGlooC1ERKN3c1013intrusive_ptrINS_5StoreENS1_6detail34intrusive_target_"
    "default_null_typeIS3_EEEEiiNS2_INS0_7OptionsENS5_ISA_EEEE");

using lorakit::guarded;

// One process group and its timeout.
struct Group {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  int64_t world;
};

// A flat buffer per bucket of gradients and, per parameter, its view in it.
struct Buckets {
  std::vector<at::Tensor> flats;
  std::vector<std::vector<at::Tensor>> params;
  std::vector<std::vector<at::Tensor>> views;
};

void wait_all(std::vector<c10::intrusive_ptr<c10d::Work>>& works, const Group& g) {
  for (auto& w : works) w->wait(g.timeout);
}
}  // namespace

extern "C" {

// Joins the group of `world` ranks as `rank`: the TCPStore at host:port
// (hosted by rank 0 unless `client_only`, as under torchrun's agent store),
// then Gloo. `timeout_ms` bounds the rendezvous and every collective.
char* lorakit_dist_new(const char* host, int64_t port, int64_t rank, int64_t world,
                       int64_t timeout_ms, int64_t client_only, void** out) {
  return guarded([&] {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0 && client_only == 0;
    so.numWorkers = static_cast<size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    StorePtr tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    StorePtr store = c10::make_intrusive<c10d::PrefixStore>("lorakit", tcp);
    OptionsPtr options = gloo_default_options(timeout);
    void* raw = ::operator new(kGlooObjectBytes);
    try {
      gloo_construct(raw, store, static_cast<int>(rank), static_cast<int>(world), options);
    } catch (...) {
      ::operator delete(raw);
      throw;
    }
    // single inheritance: the Backend base is at the object's address
    auto backend = c10::intrusive_ptr<c10d::Backend>::unsafe_steal_from_new(
        static_cast<c10d::Backend*>(raw));
    *out = new Group{backend, timeout, world};
  });
}

void lorakit_dist_free(void* g) { delete static_cast<Group*>(g); }

// Flat buckets of at most `bucket_bytes` over the parameters' shapes (one
// dtype and device per bucket), allocated once for the run.
char* lorakit_dist_buckets_new(at::Tensor** params, int64_t n, int64_t bucket_bytes, void** out) {
  return guarded([&] {
    auto* b = new Buckets();
    int64_t i = 0;
    while (i < n) {
      const at::Tensor& first = *params[i];
      int64_t j = i, bytes = 0, numel = 0;
      while (j < n && params[j]->scalar_type() == first.scalar_type() &&
             params[j]->device() == first.device() &&
             (j == i || bytes + static_cast<int64_t>(params[j]->nbytes()) <= bucket_bytes)) {
        bytes += static_cast<int64_t>(params[j]->nbytes());
        numel += params[j]->numel();
        ++j;
      }
      at::Tensor flat = at::zeros({numel}, first.options().requires_grad(false));
      std::vector<at::Tensor> ps, vs;
      int64_t off = 0;
      for (int64_t k = i; k < j; ++k) {
        ps.push_back(*params[k]);
        vs.push_back(flat.narrow(0, off, params[k]->numel()).view(params[k]->sizes()));
        off += params[k]->numel();
      }
      b->flats.push_back(flat);
      b->params.push_back(std::move(ps));
      b->views.push_back(std::move(vs));
      i = j;
    }
    *out = b;
  });
}

void lorakit_dist_buckets_free(void* b) { delete static_cast<Buckets*>(b); }

// Averages the parameters' gradients over the ranks: each bucket is filled
// (a missing gradient counts as zeros), all buckets are summed at once
// (asynchronously, then waited for), divided by the world size, and every
// gradient becomes its view into the bucket (no copy back).
char* lorakit_dist_average_grads(void* group, void* buckets) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    auto& b = *static_cast<Buckets*>(buckets);
    at::NoGradGuard no_grad;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (size_t k = 0; k < b.flats.size(); ++k) {
      for (size_t i = 0; i < b.params[k].size(); ++i) {
        const at::Tensor& grad = b.params[k][i].grad();
        if (grad.defined()) {
          b.views[k][i].copy_(grad);
        } else {
          b.views[k][i].zero_();
        }
      }
      std::vector<at::Tensor> one{b.flats[k]};
      works.push_back(g.backend->allreduce(one));
    }
    wait_all(works, g);
    for (size_t k = 0; k < b.flats.size(); ++k) {
      b.flats[k].div_(static_cast<double>(g.world));
      for (size_t i = 0; i < b.params[k].size(); ++i) {
        b.params[k][i].mutable_grad() = b.views[k][i];
      }
    }
  });
}

// Replaces the tensors' values by rank `root`'s (one flat copy).
char* lorakit_dist_broadcast(void* group, at::Tensor** ts, int64_t n, int64_t root) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> flat_parts;
    for (int64_t i = 0; i < n; ++i) flat_parts.push_back(ts[i]->detach().reshape({-1}));
    if (flat_parts.empty()) return;
    std::vector<at::Tensor> one{at::cat(flat_parts)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    auto work = g.backend->broadcast(one, o);
    work->wait(g.timeout);
    int64_t off = 0;
    for (int64_t i = 0; i < n; ++i) {
      ts[i]->detach().copy_(one[0].narrow(0, off, ts[i]->numel()).view(ts[i]->sizes()));
      off += ts[i]->numel();
    }
  });
}

// Reduces `t` in place over the ranks: op 0 sum, 1 max.
char* lorakit_dist_all_reduce(void* group, at::Tensor* t, int64_t op) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    std::vector<at::Tensor> one{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    auto work = g.backend->allreduce(one, o);
    work->wait(g.timeout);
  });
}

// Waits until every rank has arrived.
char* lorakit_dist_barrier(void* group) {
  return guarded([&] {
    auto& g = *static_cast<Group*>(group);
    auto work = g.backend->barrier(c10d::BarrierOptions());
    work->wait(g.timeout);
  });
}

}  // extern "C"
