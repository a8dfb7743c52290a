// Convolution forward, backward-data and backward-filter (2-D, 3-D, and 1-D as 2-D with a
// unit axis) through the cuDNN frontend graph API: conv_fprop, conv_dgrad, conv_wgrad.
// Targets (jaxdnn/conv.py is the contract; each with a trailing u8 workspace result, sized
// in Python by the dnn.conv.workspace_limit policy; only plans that fit it are considered):
//   jaxdnn_conv_fwd         img, kerns      -> out
//   jaxdnn_conv_bwd_data    kerns, topgrad  -> img gradient
//   jaxdnn_conv_bwd_filter  img, topgrad    -> kernel gradient
// Kernels follow the images' layout: (K, C/groups, spatial...) or (K, spatial..., C/groups).
//
// How an algo name becomes a plan (the README's table says the same):
//   none, small, large  heuristic order, no FFT or Winograd engines; they differ in the
//               workspace Python grants (none and small a capped amount, large the whole
//               limit). 'none' does not mean "no workspace": cuDNN 9's engines that need
//               none are far slower than the heuristic's choice for backward passes
//               (BENCHMARKS.md), and 'none' is the backward flags' default.
//   fft, fft_tiling  engines with cuDNN's FFT numerical note
//   winograd    engines with the Winograd note
//   deterministic / guess_*  heuristic order (deterministic already excludes atomics)
//   time_*      every heuristic candidate (modes A, B and fallback) built and timed once
//               at initialize; the winner is kept for the process and, under
//               JAXDNN_CACHE_DIR, on disk.
// deterministic=1 removes engines with the NONDETERMINISTIC note; allow_tf32=0 removes
// tensor-core engines for float32 data (they compute in TF32). A name that leaves no
// engine for a convolution falls back to the heuristic choice with a warning (once: the
// plan is cached).
#include "common/registry.h"

#ifdef JAXDNN_HAVE_CUDNN_FRONTEND

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "common/frontend.h"
#include "common/staged_op.h"

using Ints = xla::ffi::Span<const int64_t>;
#define JAXDNN_CONV_ATTRS(X)                                                    \
  X(Ints, pre_padding) /* one entry per spatial axis, like the next three */    \
  X(Ints, post_padding)                                                         \
  X(Ints, strides)                                                              \
  X(Ints, dilation)                                                             \
  X(int64_t, flip) /* 1: convolution, 0: cross-correlation */                   \
  X(std::string_view, layout)                                                   \
  X(std::string_view, compute_dtype)                                            \
  X(std::string_view, algo) /* Theano's algorithm name for this pass (above) */ \
  X(int64_t, deterministic)                                                     \
  X(int64_t, allow_tf32)
JAXDNN_DEFINE_ATTRS(ConvAttrs, JAXDNN_CONV_ATTRS);

namespace jaxdnn {
namespace {

enum class Pass { kFwd, kBwdData, kBwdFilter };

const char* PassName(Pass pass) {
  constexpr const char* kNames[] = {"conv_fwd", "conv_bwd_data", "conv_bwd_filter"};
  return kNames[static_cast<int>(pass)];
}

// Tensor uids in every graph: the variant pack maps them to buffers.
constexpr int64_t kImageUid = 1, kKernelUid = 2, kOutputUid = 3;

struct ConvConfig {
  Pass pass;
  std::vector<int64_t> pre_padding, post_padding, strides, dilation;
  bool flip;
  Layout layout;
  std::string compute_dtype, algo;
  bool deterministic, allow_tf32;
};

using ConvState = StagedState<ConvConfig, FrontendPlan>;

// Per-spatial-axis parameters of a 1-D convolution gain the unit axis's (value `unit`).
std::vector<int64_t> Spatial(const std::vector<int64_t>& values, int64_t unit) {
  std::vector<int64_t> out = values;
  if (out.size() == 1) out.insert(out.begin(), unit);
  return out;
}

template <typename Attributes>
Attributes ConvAttributes(const ConvConfig& c) {
  return Attributes()
      .set_pre_padding(Spatial(c.pre_padding, 0))
      .set_post_padding(Spatial(c.post_padding, 0))
      .set_stride(Spatial(c.strides, 1))
      .set_dilation(Spatial(c.dilation, 1))
      .set_convolution_mode(c.flip ? fe::ConvolutionMode_t::CONVOLUTION
                                   : fe::ConvolutionMode_t::CROSS_CORRELATION);
}

// The buffers of one call in cuDNN's terms.
struct ConvBuffers {
  TensorShape image, kernel, output;  // output: the forward's output (topgrad's shape)
  fe::DataType_t io_type;
};

std::shared_ptr<fe::graph::Graph> MakeGraph(const ConvConfig& c, const ConvBuffers& b,
                                            fe::DataType_t compute_type) {
  auto graph = std::make_shared<fe::graph::Graph>();
  graph->set_io_data_type(b.io_type)
      .set_compute_data_type(compute_type)
      .set_intermediate_data_type(compute_type == fe::DataType_t::DOUBLE ? compute_type
                                                                         : fe::DataType_t::FLOAT);
  std::shared_ptr<fe::graph::Tensor_attributes> result;
  TensorShape result_shape;
  if (c.pass == Pass::kFwd) {
    auto x = GraphInput(*graph, kImageUid, b.image, b.io_type);
    auto w = GraphInput(*graph, kKernelUid, b.kernel, b.io_type);
    result = graph->conv_fprop(x, w, ConvAttributes<fe::graph::Conv_fprop_attributes>(c));
    result_shape = b.output;
  } else if (c.pass == Pass::kBwdData) {
    auto w = GraphInput(*graph, kKernelUid, b.kernel, b.io_type);
    auto dy = GraphInput(*graph, kOutputUid, b.output, b.io_type);
    result = graph->conv_dgrad(dy, w, ConvAttributes<fe::graph::Conv_dgrad_attributes>(c));
    result_shape = b.image;
  } else {
    auto x = GraphInput(*graph, kImageUid, b.image, b.io_type);
    auto dy = GraphInput(*graph, kOutputUid, b.output, b.io_type);
    result = graph->conv_wgrad(dy, x, ConvAttributes<fe::graph::Conv_wgrad_attributes>(c));
    result_shape = b.kernel;
  }
  int64_t result_uid = c.pass == Pass::kFwd       ? kOutputUid
                       : c.pass == Pass::kBwdData ? kImageUid
                                                  : kKernelUid;
  MarkOutput(result, result_uid, result_shape, b.io_type);
  return graph;
}

// Engine filters: those that carry the call's semantics (determinism, TF32, workspace),
// and, when `with_algo`, those that express the algo name.
void ApplyFilters(fe::graph::Graph& graph, const ConvConfig& c, fe::DataType_t io_type,
                  int64_t workspace_bytes, bool with_algo) {
  graph.deselect_workspace_greater_than(workspace_bytes);
  if (c.deterministic) graph.deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
  if (!c.allow_tf32 && io_type == fe::DataType_t::FLOAT)
    graph.deselect_numeric_notes({fe::NumericalNote_t::TENSOR_CORE});
  if (!with_algo) return;
  const std::string& a = c.algo;
  if (a == "none" || a == "small" || a == "large") {
    graph.deselect_numeric_notes({fe::NumericalNote_t::FFT, fe::NumericalNote_t::WINOGRAD,
                                  fe::NumericalNote_t::WINOGRAD_TILE_4x4,
                                  fe::NumericalNote_t::WINOGRAD_TILE_6x6,
                                  fe::NumericalNote_t::WINOGRAD_TILE_13x13});
  } else if (a == "fft" || a == "fft_tiling") {
    graph.select_numeric_notes({fe::NumericalNote_t::FFT});
  } else if (a == "winograd") {
    graph.select_numeric_notes({fe::NumericalNote_t::WINOGRAD});
  } else if (a == "deterministic") {
    graph.deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
  }
}

bool Timed(const ConvConfig& c) { return c.algo.rfind("time_", 0) == 0; }

// ---- time_* persistence under JAXDNN_CACHE_DIR -------------------------------------------

std::string PersistedPath(const std::string& key) {
  const char* dir = std::getenv("JAXDNN_CACHE_DIR");
  if (dir == nullptr || *dir == '\0') return "";
  uint64_t hash = 1469598103934665603ull;  // FNV-1a: stable across processes, unlike std::hash
  for (unsigned char ch : key) hash = (hash ^ ch) * 1099511628211ull;
  char name[64];
  std::snprintf(name, sizeof(name), "/conv-%016llx.plan", static_cast<unsigned long long>(hash));
  return std::string(dir) + name;
}

// File format: the full key on the first line (checked on load: a hash collision or a
// stale file is ignored), then the winning engine configuration's name.
std::string LoadPersisted(const std::string& key) {
  std::string path = PersistedPath(key);
  if (path.empty()) return "";
  std::ifstream in(path);
  std::string stored_key, name;
  if (!std::getline(in, stored_key) || stored_key != key || !std::getline(in, name)) return "";
  return name;
}

void SavePersisted(const std::string& key, const std::string& name) {
  std::string path = PersistedPath(key);
  if (path.empty()) return;
  // Write then rename, so that a concurrent reader never sees half a file.
  std::string temporary = path + ".tmp" + std::to_string(reinterpret_cast<uintptr_t>(&name));
  {
    std::ofstream out(temporary);
    out << key << "\n" << name << "\n";
    if (!out) return;
  }
  std::rename(temporary.c_str(), path.c_str());
}

// Device scratch for the timed search: the search must not touch XLA's buffers (the output
// may alias a donated input that has not been read yet).
class Scratch {
 public:
  ~Scratch() {
    for (void* p : pointers_) cudaFree(p);
  }
  ffi::Error Allocate(const char* op, int64_t bytes, void** out) {
    JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaMalloc(out, bytes > 0 ? bytes : 1));
    pointers_.push_back(*out);
    JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaMemset(*out, 0, bytes));
    return ffi::Error::Success();
  }

 private:
  std::vector<void*> pointers_;
};

int64_t Bytes(const TensorShape& shape, int64_t element_size) {
  int64_t n = element_size;
  for (int64_t d : shape.dims) n *= d;
  return n;
}

// Runs every built candidate (one warm-up, then the best of a few timed runs) and returns
// the fastest one's index.
ffi::Error FastestCandidate(const char* op, cudnnHandle_t handle, fe::graph::Graph& graph,
                            const std::vector<int64_t>& built, const ConvBuffers& b,
                            int64_t element_size, int64_t* fastest) {
  constexpr int kTimedRuns = 3;
  Scratch scratch;
  std::unordered_map<int64_t, void*> pack;
  JAXDNN_RETURN_IF_ERROR(scratch.Allocate(op, Bytes(b.image, element_size), &pack[kImageUid]));
  JAXDNN_RETURN_IF_ERROR(scratch.Allocate(op, Bytes(b.kernel, element_size), &pack[kKernelUid]));
  JAXDNN_RETURN_IF_ERROR(scratch.Allocate(op, Bytes(b.output, element_size), &pack[kOutputUid]));
  int64_t workspace_bytes = 0;
  for (int64_t index : built)
    workspace_bytes = std::max(workspace_bytes, graph.get_workspace_size_plan_at_index(index));
  void* workspace = nullptr;
  JAXDNN_RETURN_IF_ERROR(scratch.Allocate(op, workspace_bytes, &workspace));
  cudaStream_t stream = nullptr;
  JAXDNN_RETURN_IF_CUDNN_ERROR(op, cudnnGetStream(handle, &stream));
  cudaEvent_t start, stop;
  JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaEventCreate(&start));
  JAXDNN_RETURN_IF_CUDA_ERROR(op, cudaEventCreate(&stop));
  float best = std::numeric_limits<float>::infinity();
  for (int64_t index : built) {
    if (graph.execute_plan_at_index(handle, pack, workspace, index).is_bad()) continue;
    float fastest_run = std::numeric_limits<float>::infinity();
    for (int run = 0; run < kTimedRuns; ++run) {
      cudaEventRecord(start, stream);
      (void)graph.execute_plan_at_index(handle, pack, workspace, index);
      cudaEventRecord(stop, stream);
      float ms = 0;
      if (cudaEventSynchronize(stop) == cudaSuccess &&
          cudaEventElapsedTime(&ms, start, stop) == cudaSuccess)
        fastest_run = std::min(fastest_run, ms);
    }
    if (fastest_run < best) {
      best = fastest_run;
      *fastest = index;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (best == std::numeric_limits<float>::infinity())
    return ffi::Error::Internal(std::string("jaxdnn ") + op +
                                ": no candidate plan ran in the timed search");
  return ffi::Error::Success();
}

// Builds the plan from cuDNN's heuristic candidates: with the algo's filters, falling back
// to the semantic filters alone; for time_*, the persisted winner if there is one, else
// the fastest candidate, timed now.
ffi::Error BuildPlan(const char* op, cudnnHandle_t handle, const ConvConfig& c,
                     const ConvBuffers& b, fe::DataType_t compute_type, int64_t workspace_bytes,
                     int64_t element_size, const std::string& key, FrontendPlan* plan) {
  std::shared_ptr<fe::graph::Graph> graph;
  // time_* also searches the candidates of cuDNN's slower, more thorough heuristic (mode
  // B), where it has one for the graph.
  using Modes = std::vector<fe::HeurMode_t>;
  const std::vector<Modes> mode_sets =
      Timed(c)
          ? std::vector<Modes>{{fe::HeurMode_t::A, fe::HeurMode_t::B, fe::HeurMode_t::FALLBACK},
                               {fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}}
          : std::vector<Modes>{{fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}};
  auto candidates = [&](bool with_algo) -> fe::error_t {
    fe::error_t status;
    for (const Modes& modes : mode_sets) {
      graph = MakeGraph(c, b, compute_type);
      status = CreatePlans(*graph, handle, modes);
      if (status.is_good()) break;
    }
    if (status.is_bad()) return status;
    ApplyFilters(*graph, c, b.io_type, workspace_bytes, with_algo);
    return graph->check_support();
  };
  fe::error_t support = candidates(true);
  if (support.is_bad()) {
    std::fprintf(stderr,
                 "jaxdnn %s: no cuDNN engine implements algo '%s' for this convolution (%s); "
                 "using cuDNN's heuristic choice\n",
                 op, c.algo.c_str(), support.get_message().c_str());
    support = candidates(false);
    if (support.is_bad())
      return FrontendError(op,
                           "check_support (no engine runs this convolution within the "
                           "workspace limit and the determinism/TF32 settings)",
                           support);
  }
  if (!Timed(c)) {
    JAXDNN_RETURN_IF_FE_ERROR(op, graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE));
    plan->plan_index = -1;
  } else {
    // The engine configurations' names identify them across processes.
    std::string persisted = LoadPersisted(key), name;
    int64_t count = graph->get_execution_plan_count();
    plan->plan_index = -1;
    for (int64_t i = 0; i < count && !persisted.empty(); ++i) {
      if (graph->get_plan_name_at_index(i, name).is_good() && name == persisted &&
          graph->build_plan_at_index(i).is_good()) {
        plan->plan_index = i;
        break;
      }
    }
    if (plan->plan_index < 0) {
      (void)graph->build_plans(
          fe::BuildPlanPolicy_t::ALL);  // candidates that fail to build are skipped
      std::vector<int64_t> built;
      for (int64_t i = 0; i < count; ++i)
        if (graph->get_workspace_size_plan_at_index(i, plan->workspace_size).is_good())
          built.push_back(i);
      JAXDNN_RETURN_IF_ERROR(
          FastestCandidate(op, handle, *graph, built, b, element_size, &plan->plan_index));
      if (graph->get_plan_name_at_index(plan->plan_index, name).is_good()) SavePersisted(key, name);
    }
  }
  if (plan->plan_index < 0) {
    JAXDNN_RETURN_IF_FE_ERROR(op, graph->get_workspace_size(plan->workspace_size));
  } else {
    JAXDNN_RETURN_IF_FE_ERROR(
        op, graph->get_workspace_size_plan_at_index(plan->plan_index, plan->workspace_size));
  }
  plan->graph = std::move(graph);
  return ffi::Error::Success();
}

// ---- stages -------------------------------------------------------------------------------

template <Pass pass>
ffi::Error Parse(const ConvAttrs& a, ConvConfig* c) {
  auto vec = [](Ints s) { return std::vector<int64_t>(s.begin(), s.end()); };
  c->pass = pass;
  c->pre_padding = vec(a.pre_padding);
  c->post_padding = vec(a.post_padding);
  c->strides = vec(a.strides);
  c->dilation = vec(a.dilation);
  size_t nd = c->strides.size();
  if (nd < 1 || nd > 3 || c->pre_padding.size() != nd || c->post_padding.size() != nd ||
      c->dilation.size() != nd)
    return InvalidArgument(
        PassName(pass), "padding, strides and dilation need one value per spatial axis (1 to 3)");
  c->flip = a.flip != 0;
  c->compute_dtype = std::string(a.compute_dtype);
  c->algo = std::string(a.algo);
  c->deterministic = a.deterministic != 0;
  c->allow_tf32 = a.allow_tf32 != 0;
  return ParseLayout(PassName(pass), a.layout, &c->layout);
}

// The image, kernel and forward-output buffers of a call, whichever pass it is.
struct CallBuffers {
  ffi::AnyBuffer image, kernel, output;
};

CallBuffers Arrange(Pass pass, ffi::AnyBuffer first, ffi::AnyBuffer second, ffi::AnyBuffer result) {
  switch (pass) {
    case Pass::kFwd:
      return {first, second, result};
    case Pass::kBwdData:
      return {result, first, second};
    default:
      return {first, result, second};
  }
}

ffi::Error Initialize(cudaStream_t stream, int device, ConvState* state, ffi::AnyBuffer first,
                      ffi::AnyBuffer second, ffi::Result<ffi::AnyBuffer> result,
                      ffi::Result<ffi::AnyBuffer> workspace) {
  const ConvConfig& c = state->config;
  const char* op = PassName(c.pass);
  CallBuffers call = Arrange(c.pass, first, second, *result);
  return InitializeState(
      op, stream, device, state, [&](cudnnHandle_t handle, auto* out) -> ffi::Error {
        if (AnyEmpty({call.image, call.kernel, call.output})) return ffi::Error::Success();
        size_t rank = call.image.dimensions().size();
        if (rank != c.strides.size() + 2 || call.kernel.dimensions().size() != rank ||
            call.output.dimensions().size() != rank)
          return InvalidArgument(op, "buffers of ranks that do not match the spatial parameters");
        for (const auto& buffer : {call.kernel, call.output})
          if (buffer.element_type() != call.image.element_type())
            return InvalidArgument(op, "image, kernels and output must share one dtype");
        ConvBuffers b{ShapeOf(call.image.dimensions(), c.layout),
                      ShapeOf(call.kernel.dimensions(), c.layout),
                      ShapeOf(call.output.dimensions(), c.layout), fe::DataType_t::NOT_SET};
        JAXDNN_ASSIGN_OR_RETURN(FloatType io, FloatTypeOf(op, call.image.element_type()));
        JAXDNN_ASSIGN_OR_RETURN(b.io_type, FrontendType(op, io.dtype));
        JAXDNN_ASSIGN_OR_RETURN(FloatType compute, FloatTypeNamed(op, c.compute_dtype));
        JAXDNN_ASSIGN_OR_RETURN(fe::DataType_t compute_type, FrontendType(op, compute.dtype));
        int64_t workspace_bytes = static_cast<int64_t>(workspace->size_bytes());
        int64_t element_size = static_cast<int64_t>(ffi::ByteWidth(io.dtype));
        int cc_major = 0, cc_minor = 0;
        JAXDNN_RETURN_IF_CUDA_ERROR(
            op, cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));
        JAXDNN_RETURN_IF_CUDA_ERROR(
            op, cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, device));
        // Everything that shapes the plan. The persisted (on-disk) key leaves out the device
        // ordinal, so that every device of one model shares a timed result.
        CacheKey persisted_key;
        persisted_key.Add(op)
            .Add(static_cast<int64_t>(cudnnGetVersion()))
            .Add(cc_major * 10 + cc_minor);
        persisted_key.Add(io.name)
            .Add(c.compute_dtype)
            .AddAll(b.image.dims)
            .AddAll(b.image.strides);
        persisted_key.AddAll(b.kernel.dims).AddAll(b.output.dims).AddAll(b.output.strides);
        persisted_key.AddAll(c.pre_padding)
            .AddAll(c.post_padding)
            .AddAll(c.strides)
            .AddAll(c.dilation);
        persisted_key.Add(static_cast<int64_t>(c.flip)).Add(c.algo);
        persisted_key.Add(static_cast<int64_t>(c.deterministic))
            .Add(static_cast<int64_t>(c.allow_tf32));
        persisted_key.Add(workspace_bytes);
        CacheKey key = persisted_key;
        key.Add(device);
        return ProcessCache<FrontendPlan>().GetOrBuild(
            key,
            [&](FrontendPlan* p) {
              return BuildPlan(op, handle, c, b, compute_type, workspace_bytes, element_size,
                               persisted_key.str(), p);
            },
            out);
      });
}

ffi::Error Execute(cudaStream_t stream, int device, ConvState* state, ffi::AnyBuffer first,
                   ffi::AnyBuffer second, ffi::Result<ffi::AnyBuffer> result,
                   ffi::Result<ffi::AnyBuffer> workspace) {
  const char* op = PassName(state->config.pass);
  CallBuffers call = Arrange(state->config.pass, first, second, *result);
  if (AnyEmpty({call.image, call.kernel, call.output})) {
    // An empty reduction (no images, no channels, no output pixels) gives zeros.
    if (result->size_bytes() > 0)
      JAXDNN_RETURN_IF_CUDA_ERROR(
          op, cudaMemsetAsync(result->untyped_data(), 0, result->size_bytes(), stream));
    return ffi::Error::Success();
  }
  return ExecuteState(op, stream, device, state, [&](cudnnHandle_t handle, const auto& plan) {
    std::unordered_map<int64_t, void*> pack = {{kImageUid, call.image.untyped_data()},
                                               {kKernelUid, call.kernel.untyped_data()},
                                               {kOutputUid, call.output.untyped_data()}};
    return ExecutePlan(op, plan, handle, pack, workspace->untyped_data());
  });
}

}  // namespace

void AddConvHandlers(Registry& registry) {
  registry.Add<Parse<Pass::kFwd>, Initialize, Execute>(PassName(Pass::kFwd));
  registry.Add<Parse<Pass::kBwdData>, Initialize, Execute>(PassName(Pass::kBwdData));
  registry.Add<Parse<Pass::kBwdFilter>, Initialize, Execute>(PassName(Pass::kBwdFilter));
}

}  // namespace jaxdnn

#else  // no cudnn-frontend headers at build time: convolution runs on the XLA path

namespace jaxdnn {
void AddConvHandlers(Registry&) {}
}  // namespace jaxdnn

#endif
