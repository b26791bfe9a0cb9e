// kernelhub::gguf_rows: the GGUF product for decode (1 to 8 input rows) as a torch operator written
// in C++, so that a call reaches gguf_quant.c without Python in between.
//
// A decode step of a small model makes a hundred or more products of a few hundred microseconds or
// less; through a Python custom op each paid about 20 us of dispatch and argument handling (inside
// a compiled graph as much as eagerly), through ctypes about 11. Registered here, a call costs the
// dispatcher's few microseconds, from eager code and from inductor's generated code alike.
//
// Written against torch's stable C ABI (torch/csrc/stable), which compiles in about a second, and
// linked to the gguf_quant library (its gguf_mul_mat does the work). Built on first use by
// kernelhub/backends/gguf_quant.py, which registers the operator's fake and falls back to the
// Python operator where this cannot be built.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

extern "C" int gguf_mul_mat(const void *w, int64_t row_bytes, int type, const float *x, const float *bias,
                            void *out, int bf16, int64_t M, int64_t N, int64_t K, int threads);

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

// float32 copies of bfloat16 values (a bfloat16 is the high half of a float32)
std::vector<float> widened(const Tensor &t) {
    std::vector<float> out(t.numel());
    const uint16_t *src = static_cast<const uint16_t *>(t.data_ptr());
    for (size_t i = 0; i < out.size(); i++) {
        const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
        std::memcpy(&out[i], &bits, 4);
    }
    return out;
}

bool is_float(const Tensor &t) {
    return t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::BFloat16;
}

// x @ W^T (+ bias) for packed blocks `weight` [out_features, row_bytes] and x [..., K] of 1 to 8 rows,
// float32 or bfloat16 (the result's dtype); bias float32 or bfloat16. Every tensor contiguous, on the CPU.
Tensor gguf_rows(Tensor weight, Tensor x, int64_t ggml_type, int64_t out_features, std::optional<Tensor> bias) {
    STD_TORCH_CHECK(weight.is_cpu() && x.is_cpu(), "kernelhub::gguf_rows runs on the CPU");
    STD_TORCH_CHECK(weight.scalar_type() == ScalarType::Byte && weight.dim() == 2 && weight.is_contiguous(),
                    "kernelhub::gguf_rows: weight must be contiguous 2-D uint8 blocks");
    STD_TORCH_CHECK(weight.size(0) == out_features, "kernelhub::gguf_rows: weight has ", weight.size(0),
                    " rows, out_features is ", out_features);
    STD_TORCH_CHECK(is_float(x) && x.dim() >= 1 && x.is_contiguous(),
                    "kernelhub::gguf_rows: x must be contiguous float32 or bfloat16");
    const int64_t K = x.size(x.dim() - 1), M = K > 0 ? x.numel() / K : 0;
    STD_TORCH_CHECK(M >= 1 && M <= 8, "kernelhub::gguf_rows takes 1 to 8 rows, not ", M);
    std::vector<float> bias_values;
    const float *bias_ptr = nullptr;
    if (bias.has_value()) {
        const Tensor &b = *bias;
        STD_TORCH_CHECK(b.is_cpu() && is_float(b) && b.dim() == 1 && b.size(0) == out_features && b.is_contiguous(),
                        "kernelhub::gguf_rows: bias must be contiguous float32 or bfloat16 of out_features values");
        if (b.scalar_type() == ScalarType::Float) {
            bias_ptr = static_cast<const float *>(b.data_ptr());
        } else {
            bias_values = widened(b);
            bias_ptr = bias_values.data();
        }
    }
    std::vector<float> x_values;
    const float *x_ptr = static_cast<const float *>(x.data_ptr());
    const bool bf16 = x.scalar_type() == ScalarType::BFloat16;
    if (bf16) {
        x_values = widened(x);
        x_ptr = x_values.data();
    }
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out_features;
    Tensor out = torch::stable::new_empty(x, shape);
    const int status = gguf_mul_mat(weight.data_ptr(), weight.size(1), static_cast<int>(ggml_type), x_ptr, bias_ptr,
                                    out.data_ptr(), bf16, M, out_features, K,
                                    static_cast<int>(torch::stable::get_num_threads()));
    STD_TORCH_CHECK(status == 0, "kernelhub::gguf_rows: ggml type ", ggml_type, " with ", K, " columns and rows of ",
                    weight.size(1), " bytes is refused (status ", status, ")");
    return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(kernelhub, m) {
    m.def("gguf_rows(Tensor weight, Tensor x, int ggml_type, int out_features, Tensor? bias=None) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(kernelhub, CPU, m) { m.impl("gguf_rows", TORCH_BOX(&gguf_rows)); }
