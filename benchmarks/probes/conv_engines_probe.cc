// Feasibility probe (not part of the library): for the convolutions where PyTorch stays
// ahead of jaxdnn's time_once, does any cuDNN engine outside the heuristics' lists (modes
// A, B and fallback, which time_once times) run faster? Every global engine is built at
// its default knobs, each in its own graph, and timed beside the heuristic candidates.
#include <cudnn_frontend.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <limits>
#include <string>
#include <vector>

namespace fe = cudnn_frontend;

struct Shape {
  std::vector<int64_t> dims, strides;
};

// Packed strides of `dims` (N, C, spatial...) in channels-last or channels-first order.
Shape Packed(std::vector<int64_t> dims, bool last) {
  size_t n = dims.size();
  std::vector<int64_t> strides(n);
  std::vector<size_t> order;  // innermost first
  if (last) {
    order.push_back(1);
    for (size_t i = n - 1; i >= 2; --i) order.push_back(i);
  } else {
    for (size_t i = n - 1; i >= 1; --i) order.push_back(i);
  }
  order.push_back(0);
  int64_t s = 1;
  for (size_t axis : order) {
    strides[axis] = s;
    s *= dims[axis];
  }
  return {dims, strides};
}

struct Case {
  const char* name;
  bool dgrad;  // else fprop
  fe::DataType_t type;
  bool last;
  std::vector<int64_t> image, kernel, output, pad, stride;
};

int64_t Count(const std::vector<int64_t>& d) {
  int64_t n = 1;
  for (int64_t v : d) n *= v;
  return n;
}

std::shared_ptr<fe::graph::Graph> MakeGraph(const Case& c) {
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(c.type).set_compute_data_type(fe::DataType_t::FLOAT).set_intermediate_data_type(fe::DataType_t::FLOAT);
  Shape xi = Packed(c.image, c.last), wi = Packed(c.kernel, c.last), yi = Packed(c.output, c.last);
  std::vector<int64_t> dil(c.pad.size(), 1);
  auto tensor = [&](const char* name, int64_t uid, const Shape& s) {
    return g->tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim(s.dims).set_stride(s.strides).set_data_type(c.type));
  };
  std::shared_ptr<fe::graph::Tensor_attributes> out;
  Shape out_shape;
  if (c.dgrad) {
    auto w = tensor("w", 2, wi);
    auto dy = tensor("dy", 3, yi);
    out = g->conv_dgrad(dy, w, fe::graph::Conv_dgrad_attributes().set_padding(c.pad).set_stride(c.stride).set_dilation(dil));
    out->set_uid(1);
    out_shape = xi;
  } else {
    auto x = tensor("x", 1, xi);
    auto w = tensor("w", 2, wi);
    out = g->conv_fprop(x, w, fe::graph::Conv_fprop_attributes().set_padding(c.pad).set_stride(c.stride).set_dilation(dil));
    out->set_uid(3);
    out_shape = yi;
  }
  out->set_output(true).set_dim(out_shape.dims).set_stride(out_shape.strides).set_data_type(c.type);
  return g;
}

float Time(cudnnHandle_t h, fe::graph::Graph& g, int64_t index, std::unordered_map<int64_t, void*>& pack, void* ws) {
  if (g.execute_plan_at_index(h, pack, ws, index).is_bad()) return -1;
  cudaDeviceSynchronize();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  float best = std::numeric_limits<float>::infinity();
  for (int r = 0; r < 3; ++r) {
    cudaEventRecord(a);
    for (int i = 0; i < 10; ++i) (void)g.execute_plan_at_index(h, pack, ws, index);
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    best = std::min(best, ms / 10);
  }
  return best;
}

int main() {
  cudnnHandle_t h;
  if (cudnnCreate(&h) != CUDNN_STATUS_SUCCESS) return 1;
  const int64_t ws_bytes = 1LL << 30;
  void* ws;
  cudaMalloc(&ws, ws_bytes);
  using T = fe::DataType_t;
  std::vector<Case> cases = {
      {"res4 3x3 fwd bf16 NHWC", false, T::BFLOAT16, true, {64, 256, 14, 14}, {256, 256, 3, 3}, {64, 256, 14, 14}, {1, 1}, {1, 1}},
      {"res2 3x3 fwd bf16 NHWC", false, T::BFLOAT16, true, {64, 64, 56, 56}, {64, 64, 3, 3}, {64, 64, 56, 56}, {1, 1}, {1, 1}},
      {"1x1 fwd bf16 NHWC", false, T::BFLOAT16, true, {64, 256, 56, 56}, {64, 256, 1, 1}, {64, 64, 56, 56}, {0, 0}, {1, 1}},
      {"res4 3x3 fwd f32 NHWC", false, T::FLOAT, true, {64, 256, 14, 14}, {256, 256, 3, 3}, {64, 256, 14, 14}, {1, 1}, {1, 1}},
      {"tconv2d dgrad f32 NCHW", true, T::FLOAT, false, {64, 128, 32, 32}, {256, 128, 4, 4}, {64, 256, 16, 16}, {1, 1}, {2, 2}},
      {"tconv2d dgrad f32 NHWC", true, T::FLOAT, true, {64, 128, 32, 32}, {256, 128, 4, 4}, {64, 256, 16, 16}, {1, 1}, {2, 2}},
      {"tconv3d dgrad bf16 NDHWC", true, T::BFLOAT16, true, {4, 32, 32, 32, 32}, {64, 32, 4, 4, 4}, {4, 64, 16, 16, 16}, {1, 1, 1}, {2, 2, 2}},
      {"tconv3d dgrad f32 NDHWC", true, T::FLOAT, true, {4, 32, 32, 32, 32}, {64, 32, 4, 4, 4}, {4, 64, 16, 16, 16}, {1, 1, 1}, {2, 2, 2}},
      {"tconv1d dgrad f32 NHWC", true, T::FLOAT, true, {16, 256, 1, 8192}, {512, 256, 1, 16}, {16, 512, 1, 1024}, {0, 4}, {1, 8}},
  };
  for (const Case& c : cases) {
    int64_t esize = c.type == T::FLOAT ? 4 : 2;
    std::unordered_map<int64_t, void*> pack;
    void *x, *w, *y;
    cudaMalloc(&x, Count(c.image) * esize);
    cudaMalloc(&w, Count(c.kernel) * esize);
    cudaMalloc(&y, Count(c.output) * esize);
    cudaMemset(x, 0, Count(c.image) * esize);
    cudaMemset(w, 0, Count(c.kernel) * esize);
    cudaMemset(y, 0, Count(c.output) * esize);
    pack[1] = x;
    pack[2] = w;
    pack[3] = y;
    // The heuristic candidates, as time_once sees them.
    float best_h = std::numeric_limits<float>::infinity();
    std::string name_h;
    int built_h = 0;
    {
      auto g = MakeGraph(c);
      if (g->validate().is_good() && g->build_operation_graph(h).is_good() &&
          g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::B, fe::HeurMode_t::FALLBACK}).is_good()) {
        g->deselect_workspace_greater_than(ws_bytes);
        (void)g->check_support();
        (void)g->build_plans(fe::BuildPlanPolicy_t::ALL);
        for (int64_t i = 0; i < g->get_execution_plan_count(); ++i) {
          int64_t need = 0;
          if (g->get_workspace_size_plan_at_index(i, need).is_bad()) continue;
          float ms = Time(h, *g, i, pack, ws);
          if (ms <= 0) continue;
          ++built_h;
          if (ms < best_h) {
            best_h = ms;
            (void)g->get_plan_name_at_index(i, name_h);
          }
        }
      }
    }
    // Every global engine at its default knobs, one graph each.
    float best_e = std::numeric_limits<float>::infinity();
    std::string name_e;
    int built_e = 0;
    int64_t engines = 0;
    {
      auto probe = MakeGraph(c);
      if (probe->validate().is_good() && probe->build_operation_graph(h).is_good()) (void)probe->get_engine_count(engines);
    }
    for (int64_t e = 0; e < engines; ++e) {
      auto g = MakeGraph(c);
      if (g->validate().is_bad() || g->build_operation_graph(h).is_bad()) continue;
      if (g->create_execution_plan(e, {}).is_bad()) continue;
      g->deselect_workspace_greater_than(ws_bytes);
      if (g->check_support().is_bad()) continue;
      if (g->build_plans(fe::BuildPlanPolicy_t::ALL).is_bad()) continue;
      float ms = Time(h, *g, 0, pack, ws);
      if (ms <= 0) continue;
      ++built_e;
      if (ms < best_e) {
        best_e = ms;
        (void)g->get_plan_name_at_index(0, name_e);
      }
    }
    std::printf("%-26s heuristics: %2d plans, best %.4f ms (%s) | all %lld engines: %2d built, best %.4f ms (%s) | ratio %.3f\n",
                c.name, built_h, best_h, name_h.c_str(), (long long)engines, built_e, best_e, name_e.c_str(), best_h / best_e);
    std::fflush(stdout);
    cudaFree(x);
    cudaFree(w);
    cudaFree(y);
  }
  return 0;
}
