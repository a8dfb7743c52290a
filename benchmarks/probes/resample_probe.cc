// Feasibility probe (not part of the library): can cuDNN's backend resample operations run
// max pooling 3x3/2 pad 1 on N64 C64 112^2 float32 with a saved index (forward writes y and
// the argmax index; backward reads dy and the index only), in NCHW and in NHWC, with int8
// and int32 indices, and how fast, beside the legacy cudnnPooling* calls.
#include <cudnn_frontend.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace fe = cudnn_frontend;

#define CUDA_OK(x)                                                                    \
  do {                                                                                \
    cudaError_t e = (x);                                                              \
    if (e != cudaSuccess) {                                                           \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e), __FILE__, __LINE__); \
      std::exit(1);                                                                   \
    }                                                                                 \
  } while (0)

constexpr int64_t N = 64, C = 64, H = 112, W = 112, OH = 56, OW = 56;

std::vector<int64_t> Strides(bool nhwc, int64_t c, int64_t h, int64_t w) {
  if (nhwc) return {h * w * c, 1, w * c, c};
  return {c * h * w, h * w, w, 1};
}

fe::Tensor Make(int64_t uid, bool nhwc, int64_t h, int64_t w, cudnnDataType_t type) {
  std::vector<int64_t> dims = {N, C, h, w};
  auto strides = Strides(nhwc, C, h, w);
  return fe::TensorBuilder()
      .setDim(4, dims.data())
      .setStride(4, strides.data())
      .setId(uid)
      .setAlignment(16)
      .setDataType(type)
      .build();
}

float TimePlan(cudnnHandle_t handle, fe::ExecutionPlan& plan, std::vector<void*> ptrs,
               std::vector<int64_t> uids, void* workspace) {
  auto pack = fe::VariantPackBuilder()
                  .setWorkspacePointer(workspace)
                  .setDataPointers(ptrs.size(), ptrs.data())
                  .setUids(uids.size(), uids.data())
                  .build();
  if (cudnnBackendExecute(handle, plan.get_raw_desc(), pack.get_raw_desc()) != CUDNN_STATUS_SUCCESS)
    return -1;
  CUDA_OK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  cudaEventRecord(a);
  constexpr int kRuns = 20;
  for (int i = 0; i < kRuns; ++i) cudnnBackendExecute(handle, plan.get_raw_desc(), pack.get_raw_desc());
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  return ms / kRuns;
}

// Every engine of the graph (global enumeration, default knobs) that builds: the fastest
// plan's time, its name, and how many built.
struct Best {
  float ms = -1;
  std::string name;
  int built = 0;
  std::string why;
};

Best Search(cudnnHandle_t handle, fe::OperationGraph& graph, std::vector<void*> ptrs,
            std::vector<int64_t> uids, void* workspace, int64_t workspace_bytes) {
  Best best;
  int64_t count = graph.getEngineCount();
  for (int64_t i = 0; i < count; ++i) {
    try {
      auto engine = fe::EngineBuilder().setOperationGraph(graph).setGlobalEngineIdx(i).build();
      auto config = fe::EngineConfigBuilder().setEngine(engine).build();
      auto plan = fe::ExecutionPlanBuilder().setHandle(handle).setEngineConfig(config).build();
      if (plan.getWorkspaceSize() > workspace_bytes) continue;
      ++best.built;
      float ms = TimePlan(handle, plan, ptrs, uids, workspace);
      if (ms > 0 && (best.ms < 0 || ms < best.ms)) {
        best.ms = ms;
        best.name = plan.getTag();
      }
    } catch (fe::cudnnException& e) {
      best.why = e.what();
    }
  }
  return best;
}

int main() {
  cudnnHandle_t handle;
  if (cudnnCreate(&handle) != CUDNN_STATUS_SUCCESS) return 1;
  std::printf("cuDNN %zu\n", cudnnGetVersion());
  const size_t x_count = N * C * H * W, y_count = N * C * OH * OW;
  std::vector<float> hx(x_count), hdy(y_count);
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (auto& v : hx) v = normal(rng);
  for (auto& v : hdy) v = normal(rng);
  float *x, *y, *dy, *dx, *y_legacy, *dx_legacy;
  void *index, *workspace;
  const int64_t workspace_bytes = 256 << 20;
  CUDA_OK(cudaMalloc(&x, x_count * 4));
  CUDA_OK(cudaMalloc(&dx, x_count * 4));
  CUDA_OK(cudaMalloc(&dx_legacy, x_count * 4));
  CUDA_OK(cudaMalloc(&y, y_count * 4));
  CUDA_OK(cudaMalloc(&y_legacy, y_count * 4));
  CUDA_OK(cudaMalloc(&dy, y_count * 4));
  CUDA_OK(cudaMalloc(&index, y_count * 4));
  CUDA_OK(cudaMalloc(&workspace, workspace_bytes));
  CUDA_OK(cudaMemcpy(x, hx.data(), x_count * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dy, hdy.data(), y_count * 4, cudaMemcpyHostToDevice));
  double dy_sum = 0;
  for (float v : hdy) dy_sum += v;

  for (bool nhwc : {false, true}) {
    const char* layout = nhwc ? "NHWC" : "NCHW";
    // Legacy reference (x, y, dy -> dx), in the same layout.
    {
      cudnnTensorDescriptor_t xd, yd;
      cudnnPoolingDescriptor_t pd;
      cudnnCreateTensorDescriptor(&xd);
      cudnnCreateTensorDescriptor(&yd);
      cudnnCreatePoolingDescriptor(&pd);
      auto fmt = nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
      cudnnSetTensor4dDescriptor(xd, fmt, CUDNN_DATA_FLOAT, N, C, H, W);
      cudnnSetTensor4dDescriptor(yd, fmt, CUDNN_DATA_FLOAT, N, C, OH, OW);
      cudnnSetPooling2dDescriptor(pd, CUDNN_POOLING_MAX, CUDNN_NOT_PROPAGATE_NAN, 3, 3, 1, 1, 2, 2);
      float one = 1, zero = 0;
      auto fwd = [&] { cudnnPoolingForward(handle, pd, &one, xd, x, &zero, yd, y_legacy); };
      auto bwd = [&] {
        cudnnPoolingBackward(handle, pd, &one, yd, y_legacy, yd, dy, xd, x, &zero, xd, dx_legacy);
      };
      fwd();
      bwd();
      CUDA_OK(cudaDeviceSynchronize());
      cudaEvent_t a, b;
      cudaEventCreate(&a);
      cudaEventCreate(&b);
      float fms = 0, bms = 0;
      cudaEventRecord(a);
      for (int i = 0; i < 20; ++i) fwd();
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      cudaEventElapsedTime(&fms, a, b);
      cudaEventRecord(a);
      for (int i = 0; i < 20; ++i) bwd();
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      cudaEventElapsedTime(&bms, a, b);
      std::printf("%s legacy: fwd %.4f ms, bwd %.4f ms, fwd+bwd %.4f ms\n", layout, fms / 20,
                  bms / 20, (fms + bms) / 20);
    }
    for (cudnnDataType_t index_type : {CUDNN_DATA_INT8, CUDNN_DATA_INT32}) {
      const char* index_name = index_type == CUDNN_DATA_INT8 ? "int8" : "int32";
      int64_t window[2] = {3, 3}, stride[2] = {2, 2}, pad[2] = {1, 1};
      try {
        auto resample = fe::ResampleDescBuilder_v8()
                            .setComputeType(CUDNN_DATA_FLOAT)
                            .setNanPropagation(CUDNN_NOT_PROPAGATE_NAN)
                            .setResampleMode(fe::ResampleMode_t::MAXPOOL)
                            .setPaddingMode(fe::PaddingMode_t::NEG_INF_PAD)
                            .setSpatialDim(2, window)
                            .setSpatialStride(2, stride)
                            .setPrePadding(2, pad)
                            .setPostPadding(2, pad)
                            .build();
        auto xt = Make(1, nhwc, H, W, CUDNN_DATA_FLOAT);
        auto yt = Make(2, nhwc, OH, OW, CUDNN_DATA_FLOAT);
        auto it = Make(3, nhwc, OH, OW, index_type);
        auto fwd_op = fe::OperationBuilder(CUDNN_BACKEND_OPERATION_RESAMPLE_FWD_DESCRIPTOR)
                          .setxDesc(xt)
                          .setyDesc(yt)
                          .setidxDesc(it)
                          .setResampleDesc(resample)
                          .setAlpha(1.0)
                          .setBeta(0.0)
                          .build();
        std::array<fe::Operation const*, 1> fops = {&fwd_op};
        auto fgraph = fe::OperationGraphBuilder().setHandle(handle).setOperationGraph(1, fops.data()).build();
        Best f = Search(handle, fgraph, {x, y, index}, {1, 2, 3}, workspace, workspace_bytes);
        std::printf("%s %s resample fwd: %d engines built, best %.4f ms (%s) %s\n", layout, index_name,
                    f.built, f.ms, f.name.c_str(), f.ms < 0 ? f.why.c_str() : "");
        if (f.ms > 0) {  // check y against the legacy forward
          std::vector<float> a(y_count), b(y_count);
          CUDA_OK(cudaMemcpy(a.data(), y, y_count * 4, cudaMemcpyDeviceToHost));
          CUDA_OK(cudaMemcpy(b.data(), y_legacy, y_count * 4, cudaMemcpyDeviceToHost));
          double worst = 0;
          for (size_t i = 0; i < y_count; ++i) worst = std::max(worst, (double)std::fabs(a[i] - b[i]));
          std::printf("  y vs legacy: max |diff| %.3g\n", worst);
        }
        auto dyt = Make(4, nhwc, OH, OW, CUDNN_DATA_FLOAT);
        auto dxt = Make(5, nhwc, H, W, CUDNN_DATA_FLOAT);
        auto it2 = Make(3, nhwc, OH, OW, index_type);
        auto bwd_op = fe::OperationBuilder(CUDNN_BACKEND_OPERATION_RESAMPLE_BWD_DESCRIPTOR)
                          .setdxDesc(dxt)
                          .setdyDesc(dyt)
                          .setidxDesc(it2)
                          .setResampleDesc(resample)
                          .setAlpha(1.0)
                          .setBeta(0.0)
                          .build();
        std::array<fe::Operation const*, 1> bops = {&bwd_op};
        auto bgraph = fe::OperationGraphBuilder().setHandle(handle).setOperationGraph(1, bops.data()).build();
        Best bb = Search(handle, bgraph, {dy, dx, index}, {4, 5, 3}, workspace, workspace_bytes);
        std::printf("%s %s resample bwd (dy, index -> dx): %d engines built, best %.4f ms (%s) %s\n",
                    layout, index_name, bb.built, bb.ms, bb.name.c_str(), bb.ms < 0 ? bb.why.c_str() : "");
        if (bb.ms > 0 && f.ms > 0) {
          std::vector<float> a(x_count), b(x_count);
          CUDA_OK(cudaMemcpy(a.data(), dx, x_count * 4, cudaMemcpyDeviceToHost));
          CUDA_OK(cudaMemcpy(b.data(), dx_legacy, x_count * 4, cudaMemcpyDeviceToHost));
          double worst = 0, sum = 0;
          for (size_t i = 0; i < x_count; ++i) {
            worst = std::max(worst, (double)std::fabs(a[i] - b[i]));
            sum += a[i];
          }
          std::printf("  dx vs legacy: max |diff| %.3g; sum dx %.6g, sum dy %.6g; fwd+bwd %.4f ms\n",
                      worst, sum, dy_sum, f.ms + bb.ms);
        }
      } catch (fe::cudnnException& e) {
        std::printf("%s %s resample: %s\n", layout, index_name, e.what());
      }
    }
  }
  return 0;
}
