// lora-rs CUDA kernels, compiled with NVRTC on first use (see docs/cuda.md).
// Conventions: f32 row-major tensors; one thread per element unless said otherwise;
// sizes are unsigned long long so that tensors beyond 2^31 elements work.

typedef unsigned long long u64;
typedef unsigned int u32;

// NVRTC compiles without the host headers: no INFINITY / NAN macros, so spell them out.
#define NEG_INF_F __int_as_float(0xff800000)
#define NAN_D __longlong_as_double(0x7ff8000000000000LL)
__device__ __forceinline__ bool is_nan_d(double x) { return x != x; }
__device__ __forceinline__ bool is_finite_f(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }

#define GRID_STRIDE(i, n) for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

// ---------------------------------------------------------------- Philox4x32-10
// Bit-identical to lora-core/src/rng.rs: key = seed, counter = (index / 4, stream),
// word index % 4, uniform = (word >> 8) * 2^-24.
__device__ __forceinline__ u32 philox_word(u64 seed, u64 stream, u64 index) {
    u64 block = index >> 2;
    u32 c0 = (u32)block, c1 = (u32)(block >> 32), c2 = (u32)stream, c3 = (u32)(stream >> 32);
    u32 k0 = (u32)seed, k1 = (u32)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    u32 w = index & 3;
    return w == 0 ? c0 : (w == 1 ? c1 : (w == 2 ? c2 : c3));
}

__device__ __forceinline__ float dropout_keep(u64 seed, u64 stream, u64 index, float p) {
    float u = (float)(philox_word(seed, stream, index) >> 8) * (1.0f / 16777216.0f);
    return u >= p ? 1.0f / (1.0f - p) : 0.0f;
}

extern "C" __global__ void dropout_mask(float* out, u64 n, u64 seed, u64 stream, u64 offset, float p) {
    GRID_STRIDE(i, n) { out[i] = dropout_keep(seed, stream, offset + i, p); }
}

// ---------------------------------------------------------------- elementwise
extern "C" __global__ void binary_op(int op, const float* a, const float* b, float* out, u64 n) {
    GRID_STRIDE(i, n) {
        float x = a[i], y = b[i];
        out[i] = op == 0 ? x + y : op == 1 ? x - y : op == 2 ? x * y : x / y;
    }
}

__device__ __forceinline__ float gelu_cdf(float x) { return 0.5f * (1.0f + erff(x * 0.70710678118654752f)); }

extern "C" __global__ void unary_op(int op, const float* a, float* out, u64 n) {
    GRID_STRIDE(i, n) {
        float x = a[i];
        out[i] = op == 0 ? fmaxf(x, 0.0f) : op == 1 ? x * gelu_cdf(x) : op == 2 ? tanhf(x) : op == 3 ? sqrtf(x) : x * x;
    }
}

extern "C" __global__ void unary_backward(int op, const float* x, const float* dy, float* out, u64 n) {
    GRID_STRIDE(i, n) {
        float v = x[i], d;
        if (op == 0) d = v > 0.0f ? 1.0f : 0.0f;
        else if (op == 1) d = gelu_cdf(v) + v * expf(-0.5f * v * v) * 0.3989422804014327f;
        else { float t = tanhf(v); d = 1.0f - t * t; }
        out[i] = dy[i] * d;
    }
}

extern "C" __global__ void axpby(float alpha, const float* x, float beta, float* y, u64 n) {
    GRID_STRIDE(i, n) { y[i] = alpha * x[i] + beta * y[i]; }
}

extern "C" __global__ void affine(const float* a, float mul, float add, float* out, u64 n) {
    GRID_STRIDE(i, n) { out[i] = a[i] * mul + add; }
}

extern "C" __global__ void add_row_broadcast(float* a, const float* row, u64 rows, u64 cols) {
    GRID_STRIDE(i, rows * cols) { a[i] += row[i % cols]; }
}

extern "C" __global__ void gather_rows(const float* src, const u64* idx, float* out, u64 n, u64 cols) {
    GRID_STRIDE(i, n * cols) { out[i] = src[idx[i / cols] * cols + i % cols]; }
}

// Rows are distinct (checked on the host), so no two threads add to one element.
extern "C" __global__ void scatter_add_rows(float* dst, const u64* idx, const float* src, u64 n, u64 cols) {
    GRID_STRIDE(i, n * cols) { dst[idx[i / cols] * cols + i % cols] += src[i]; }
}

extern "C" __global__ void slice_cols(const float* src, float* out, u64 rows, u64 cols, u64 start, u64 len) {
    GRID_STRIDE(i, rows * len) { out[i] = src[(i / len) * cols + start + i % len]; }
}

extern "C" __global__ void assign_cols(float* dst, const float* src, u64 rows, u64 cols, u64 start, u64 len) {
    GRID_STRIDE(i, rows * len) { dst[(i / len) * cols + start + i % len] = src[i]; }
}

// out[d] = a[permuted index]; meta = [rank, out dims (6), input strides of each output axis (6)].
extern "C" __global__ void permute(const float* src, float* out, const u64* meta, u64 n) {
    int rank = (int)meta[0];
    GRID_STRIDE(i, n) {
        u64 rem = i, off = 0;
        for (int ax = rank - 1; ax >= 0; --ax) {
            u64 d = meta[1 + ax];
            off += (rem % d) * meta[7 + ax];
            rem /= d;
        }
        out[i] = src[off];
    }
}

// ---------------------------------------------------------------- reductions
// Column sums of a [rows, cols] matrix: one thread per column.
extern "C" __global__ void sum_rows(const float* a, float* out, u64 rows, u64 cols) {
    GRID_STRIDE(c, cols) {
        double s = 0.0;
        for (u64 r = 0; r < rows; ++r) s += a[r * cols + c];
        out[c] = (float)s;
    }
}

// Block-wide sum of one double per thread (blockDim.x a power of two <= 1024).
__device__ double block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double r = shared[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    float r = shared[0];
    __syncthreads();
    return r;
}

// Row sums: one block per row.
extern "C" __global__ void sum_cols(const float* a, float* out, u64 rows, u64 cols) {
    __shared__ double shared[256];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        double s = 0.0;
        for (u64 c = threadIdx.x; c < cols; c += blockDim.x) s += a[r * cols + c];
        s = block_sum(s, shared);
        if (threadIdx.x == 0) out[r] = (float)s;
    }
}

// Per-block partials of sum (mode 0), max |x| (mode 1, NaN propagates) or the count of
// non-finite values (mode 2); the host combines the partials.
extern "C" __global__ void reduce_partial(int mode, const float* a, double* partial, u64 n) {
    __shared__ double shared[256];
    double acc = 0.0;
    GRID_STRIDE(i, n) {
        float v = a[i];
        if (mode == 0) acc += v;
        else if (mode == 1) acc = (v != v || is_nan_d(acc)) ? NAN_D : fmax(acc, (double)fabsf(v));
        else acc += is_finite_f(v) ? 0.0 : 1.0;
    }
    if (mode == 1) {
        shared[threadIdx.x] = acc;
        __syncthreads();
        for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                double x = shared[threadIdx.x], y = shared[threadIdx.x + s];
                shared[threadIdx.x] = (is_nan_d(x) || is_nan_d(y)) ? NAN_D : fmax(x, y);
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) partial[blockIdx.x] = shared[0];
    } else {
        double s = block_sum(acc, shared);
        if (threadIdx.x == 0) partial[blockIdx.x] = s;
    }
}

// ---------------------------------------------------------------- softmax, LayerNorm
// One block per row; the mask row is (row / rows_per_batch).
extern "C" __global__ void softmax_rows(const float* x, const float* mask, float* out, u64 rows, u64 n, u64 rows_per_batch) {
    __shared__ float fshared[256];
    __shared__ double dshared[256];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * n;
        const float* m = mask ? mask + (r / rows_per_batch) * n : 0;
        float mx = NEG_INF_F;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, row[j] + (m ? m[j] : 0.0f));
        mx = block_max(mx, fshared);
        double s = 0.0;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) {
            float e = expf(row[j] + (m ? m[j] : 0.0f) - mx);
            out[r * n + j] = e;
            s += e;
        }
        float inv = (float)(1.0 / block_sum(s, dshared));
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) out[r * n + j] *= inv;
    }
}

extern "C" __global__ void softmax_backward(const float* y, const float* dy, float* out, u64 rows, u64 n) {
    __shared__ double shared[256];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        double dot = 0.0;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) dot += (double)y[r * n + j] * dy[r * n + j];
        float d = (float)block_sum(dot, shared);
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) out[r * n + j] = y[r * n + j] * (dy[r * n + j] - d);
    }
}

extern "C" __global__ void layer_norm(const float* x, const float* g, const float* b, float* out, float* stats, u64 rows, u64 n, float eps) {
    __shared__ double shared[256];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* row = x + r * n;
        double s = 0.0;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) s += row[j];
        double mean = block_sum(s, shared) / n;
        double v = 0.0;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) { double d = row[j] - mean; v += d * d; }
        double var = block_sum(v, shared) / n;
        float fm = (float)mean, rstd = (float)(1.0 / sqrt(var + eps));
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) out[r * n + j] = (row[j] - fm) * rstd * g[j] + b[j];
        if (threadIdx.x == 0) { stats[2 * r] = fm; stats[2 * r + 1] = rstd; }
    }
}

extern "C" __global__ void layer_norm_backward(const float* x, const float* stats, const float* g, const float* dy, float* out, u64 rows, u64 n) {
    __shared__ double shared[256];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float mean = stats[2 * r], rstd = stats[2 * r + 1];
        double s1 = 0.0, s2 = 0.0;
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) {
            float gd = g[j] * dy[r * n + j];
            s1 += gd;
            s2 += gd * (x[r * n + j] - mean) * rstd;
        }
        float m1 = (float)(block_sum(s1, shared) / n), m2 = (float)(block_sum(s2, shared) / n);
        for (u64 j = threadIdx.x; j < n; j += blockDim.x) {
            float xhat = (x[r * n + j] - mean) * rstd;
            out[r * n + j] = rstd * (g[j] * dy[r * n + j] - m1 - xhat * m2);
        }
    }
}

// ---------------------------------------------------------------- optimizer
// Adam / AdamW step with torch's rules on one tensor (bias corrections precomputed on the
// host: bc1 = 1 - beta1^t, inv_bc2_sqrt = 1 / sqrt(1 - beta2^t)), as the ndarray reference.
extern "C" __global__ void adam_step(float* p, const float* grad, float* m, float* v, u64 n, float lr, float beta1, float beta2, float eps, float weight_decay, int decoupled, float bc1, float inv_bc2_sqrt) {
    GRID_STRIDE(i, n) {
        float g = grad[i];
        if (decoupled) p[i] *= 1.0f - lr * weight_decay;
        else g += weight_decay * p[i];
        float mi = beta1 * m[i] + (1.0f - beta1) * g;
        float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi; v[i] = vi;
        float denom = sqrtf(vi) * inv_bc2_sqrt + eps;
        p[i] -= (lr / bc1) * mi / denom;
    }
}

// ---------------------------------------------------------------- quantization
// NF4/FP4 blockwise: out[j] = code[nibble(start + j)] * absmax(block). With double
// quantization the block's absmax is nested_code[qabsmax[b]] * nested_absmax[b / nested_bs] + offset.
extern "C" __global__ void dequantize_4bit(const unsigned char* packed, const float* code, const float* absmax_f32,
                                           const unsigned char* qabsmax, const float* nested_code, const float* nested_absmax,
                                           float offset, u64 nested_bs, u64 blocksize, u64 start, u64 packed_base, float* out, u64 n) {
    GRID_STRIDE(j, n) {
        u64 e = start + j, b = e / blocksize;
        unsigned char byte = packed[(e >> 1) - packed_base];
        unsigned char q = (e & 1) ? (byte & 0x0f) : (byte >> 4);
        // Explicitly rounded multiply then add: the host (and bitsandbytes) round twice, and
        // NVRTC's default --fmad=true would contract this into one FMA, one ulp off in ~0.6%
        // of the weights (seen on an H200). Kernels that need not match the host keep FMA.
        float scale = absmax_f32 ? absmax_f32[b]
                                 : __fadd_rn(__fmul_rn(nested_code[qabsmax[b]], nested_absmax[b / nested_bs]), offset);
        out[j] = code[q] * scale;
    }
}

// Row-wise int8 (cb holds rows row0.. only): out[r, c] = CB[r, c] * SCB[row0 + r] * (1/127).
extern "C" __global__ void dequantize_int8(const signed char* cb, const float* scb, u64 row0, u64 cols, float* out, u64 n) {
    GRID_STRIDE(j, n) {
        u64 r = j / cols;
        out[j] = (float)cb[j] * scb[row0 + r] * 7.874015718698502e-3f;
    }
}
