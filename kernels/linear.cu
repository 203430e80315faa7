// CUDA C kernels of fastlinear's cupy backend (loaded by fastlinear/backends/cupy.py).
//
// Layout conventions, shared by every kernel here:
//   X  (rows, inner)  the input,     any strides (given in elements, may be 0 or negative)
//   W  (inner, cols)  the weights,   any strides; fastest when a row of W is contiguous
//   b  (cols,)        the bias,      any stride
//   Y  (rows, cols)   the output,    C-contiguous (row stride = cols)
//   dY (rows, cols)   the gradient,  any strides
// Every template body has one extern "C" wrapper per dtype (suffix _f16, _f32, _f64), so the
// Python side finds kernels by plain names. float16 is computed in float32 (loads are widened,
// sums are float32, the result is rounded once on store); float32 in float32; float64 in float64.
// No header is included, so NVRTC (CuPy's RawModule) and nvcc compile this file alike.
//
// The block shapes, activation codes and activation constants come from Python as -D defines
// (fastlinear/backends/cupy_launch.py, compile_options), so they exist in one place only.

#if !defined(BIAS_THREADS) || !defined(COLSUM_LANES) || !defined(COLSUM_ROW_LANES) ||           \
    !defined(SMALL_BATCH_ROWS) || !defined(SMALL_BATCH_COLS) || !defined(SMALL_BATCH_SLICES) || \
    !defined(SMALL_BATCH_CHUNK) || !defined(TILE_ROWS) || !defined(TILE_COLS) ||               \
    !defined(TILE_DEPTH) || !defined(TILE_THREADS) ||                                          \
    !defined(FASTLINEAR_ACT_NONE) || !defined(FASTLINEAR_ACT_RELU) ||                          \
    !defined(FASTLINEAR_ACT_GELU) || !defined(FASTLINEAR_ACT_GELU_TANH) ||                     \
    !defined(FASTLINEAR_ACT_TANH) || !defined(FASTLINEAR_ACT_SIGMOID) ||                       \
    !defined(FASTLINEAR_GELU_TANH_BETA) || !defined(FASTLINEAR_GELU_TANH_KAPPA) ||             \
    !defined(FASTLINEAR_SQRT1_2) || !defined(FASTLINEAR_INV_SQRT_2PI) ||                       \
    !defined(FASTLINEAR_GELU_CLAMP)
#error "compile with the -D defines of fastlinear.backends.cupy_launch.compile_options()"
#endif

typedef long long index_t;

// float16 as its storage bits; converted with the PTX instructions cuda_fp16.h uses itself.
struct half_bits {
    unsigned short bits;
};

template <typename T> struct Accumulator;
template <> struct Accumulator<half_bits> { typedef float type; };
template <> struct Accumulator<float> { typedef float type; };
template <> struct Accumulator<double> { typedef double type; };

__device__ __forceinline__ float widen(half_bits value)
{
    float result;
    asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(value.bits));
    return result;
}
__device__ __forceinline__ float widen(float value) { return value; }
__device__ __forceinline__ double widen(double value) { return value; }

__device__ __forceinline__ void store_rounded(half_bits* target, float value)
{
    half_bits result;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result.bits) : "f"(value));
    *target = result;
}
__device__ __forceinline__ void store_rounded(float* target, float value) { *target = value; }
__device__ __forceinline__ void store_rounded(double* target, double value) { *target = value; }

__device__ __forceinline__ index_t smaller(index_t a, index_t b) { return a < b ? a : b; }

// The products and sums of the layer keep float32 subnormals, as NumPy does, although CuPy
// compiles with -ftz=true: __fmaf_ieee_rn ignores that flag (CUDA Math API; a + b is
// fma(a, 1, b), exact in the same single rounding). Only the activation functions' own
// arithmetic flushes. (Whether cuBLAS's SGEMM keeps subnormals is not documented.)
__device__ __forceinline__ float multiply_add(float a, float b, float c)
{
    return __fmaf_ieee_rn(a, b, c);
}
__device__ __forceinline__ double multiply_add(double a, double b, double c) { return a * b + c; }
__device__ __forceinline__ float plus(float a, float b) { return __fmaf_ieee_rn(a, 1.0f, b); }
__device__ __forceinline__ double plus(double a, double b) { return a + b; }

// ---------------------------------------------------------------------------------------------
// Activations, as fastlinear/activations.py defines them (its docstring has the formulas; the
// NumPy functions there are the reference the tests hold these to). Computed in the accumulator
// type: float for float16 and float32, double for float64. `activation` is a FASTLINEAR_ACT_*
// code, the same for every thread of a launch, so the switch does not diverge.
__device__ __forceinline__ float math_exp(float x) { return expf(x); }
__device__ __forceinline__ double math_exp(double x) { return exp(x); }
__device__ __forceinline__ float math_tanh(float x) { return tanhf(x); }
__device__ __forceinline__ double math_tanh(double x) { return tanh(x); }
__device__ __forceinline__ float math_erf(float x) { return erff(x); }
__device__ __forceinline__ double math_erf(double x) { return erf(x); }

// z clamped to [-GELU_CLAMP, GELU_CLAMP] with NaN kept (fminf/fmaxf would drop it).
template <typename A> __device__ __forceinline__ A gelu_clamp(A z)
{
    const A limit = A(FASTLINEAR_GELU_CLAMP);
    return z < -limit ? -limit : (z > limit ? limit : z);
}

template <typename A> __device__ __forceinline__ A activate(int activation, A z)
{
    switch (activation) {
    case FASTLINEAR_ACT_RELU:
        return z <= A(0) ? A(0) : z;  // NaN stays NaN
    case FASTLINEAR_ACT_TANH:
        return math_tanh(z);
    case FASTLINEAR_ACT_SIGMOID: {
        const A e = math_exp(-(z < A(0) ? -z : z));  // exp of a non-positive number: no overflow
        return (z >= A(0) ? A(1) : e) / (A(1) + e);
    }
    case FASTLINEAR_ACT_GELU:
        return z * (A(0.5) * (A(1) + math_erf(z * A(FASTLINEAR_SQRT1_2))));
    case FASTLINEAR_ACT_GELU_TANH: {
        const A zc = gelu_clamp(z);
        const A cube = A(FASTLINEAR_GELU_TANH_KAPPA) * zc * zc * zc;
        const A inner = A(FASTLINEAR_GELU_TANH_BETA) * (zc + cube);
        return (A(0.5) * z) * (A(1) + math_tanh(inner));
    }
    default:
        return z;
    }
}

// dy * act'(z) from `saved`: the output y for relu, tanh and sigmoid, the pre-activation z for
// the GELUs. ReLU selects as PyTorch's threshold_backward: 0 where y <= 0, even for a NaN or
// inf dy, and dy where y is NaN.
template <typename A> __device__ __forceinline__ A activation_grad(int activation, A dy, A saved)
{
    switch (activation) {
    case FASTLINEAR_ACT_RELU:
        return saved <= A(0) ? A(0) : dy;
    case FASTLINEAR_ACT_TANH:
        return dy * (A(1) - saved * saved);
    case FASTLINEAR_ACT_SIGMOID:
        return dy * (saved * (A(1) - saved));
    case FASTLINEAR_ACT_GELU: {
        const A zc = gelu_clamp(saved);
        const A cdf = A(0.5) * (A(1) + math_erf(saved * A(FASTLINEAR_SQRT1_2)));
        const A pdf = A(FASTLINEAR_INV_SQRT_2PI) * math_exp(A(-0.5) * zc * zc);
        return dy * (cdf + zc * pdf);
    }
    case FASTLINEAR_ACT_GELU_TANH: {
        const A zc = gelu_clamp(saved);
        const A zz = zc * zc;
        const A beta = A(FASTLINEAR_GELU_TANH_BETA);
        const A t = math_tanh(beta * (zc + A(FASTLINEAR_GELU_TANH_KAPPA) * zz * zc));
        const A left = A(0.5) * (A(1) + t);
        const A right = (A(0.5) * zc) * (A(1) - t * t) *
                        (beta * (A(1) + A(3.0 * FASTLINEAR_GELU_TANH_KAPPA) * zz));
        return dy * (left + right);
    }
    default:
        return dy;
    }
}

// The forward epilogue of every path: z = sum (+ bias) goes to Z when asked (the pre-activation
// the GELUs' backward needs), act(z) to Y; each rounded once to T.
template <typename T, typename A>
__device__ __forceinline__ void store_output(T* Y, T* Z, int write_z, int activation,
                                             index_t index, A z)
{
    if (write_z) {
        store_rounded(Z + index, z);
    }
    store_rounded(Y + index, activate(activation, z));
}

// ---------------------------------------------------------------------------------------------
// Bias broadcast: Y[row, col] = b[col]. The output is then finished by cuBLAS with beta = 1
// (Y = X @ W + 1 * Y), so the bias costs one write pass and no separate read-modify-write pass.
// Block: BIAS_THREADS threads, blockDim.x along columns (all BIAS_THREADS for wide outputs; for
// narrow ones the power of two that covers the columns, so the rest of the block takes rows:
// cupy_launch.rows_launch), blockDim.y along rows. grid.x covers the columns, grid.y strides the
// rows, so each thread loads its bias element once and writes it down a column.
template <typename T>
__device__ void fill_rows_with_bias(T* Y, const T* bias, index_t bias_stride, index_t rows,
                                    index_t cols)
{
    const index_t col = blockIdx.x * (index_t)blockDim.x + threadIdx.x;
    if (col >= cols) {
        return;
    }
    const T value = bias[col * bias_stride];
    const index_t row_step = (index_t)gridDim.y * blockDim.y;
    for (index_t row = blockIdx.y * (index_t)blockDim.y + threadIdx.y; row < rows;
         row += row_step) {
        Y[row * cols + col] = value;
    }
}

// The cuBLAS path's epilogue with an activation, after a beta = 0 GEMM wrote X @ W into Y:
// z = Y + b (b optional), Z = z when write_z, Y = act(z), in one read and one write of Y.
// Same grid and block as fill_rows_with_bias.
template <typename T>
__device__ void bias_activation_epilogue(T* Y, const T* bias, index_t bias_stride, int has_bias,
                                         int activation, T* Z, int write_z, index_t rows,
                                         index_t cols)
{
    typedef typename Accumulator<T>::type acc_t;
    const index_t col = blockIdx.x * (index_t)blockDim.x + threadIdx.x;
    if (col >= cols) {
        return;
    }
    const acc_t value = has_bias ? widen(bias[col * bias_stride]) : acc_t(0);
    const index_t row_step = (index_t)gridDim.y * blockDim.y;
    for (index_t row = blockIdx.y * (index_t)blockDim.y + threadIdx.y; row < rows;
         row += row_step) {
        const index_t index = row * cols + col;
        store_output(Y, Z, write_z, activation, index, plus(widen(Y[index]), value));
    }
}

// ---------------------------------------------------------------------------------------------
// The backward pass's one read of dY: G = dY * act'(saved) into the C-contiguous G (only with an
// activation; G then feeds the two GEMMs) and, when has_db, db (+)= G.sum(axis=0).
// Block: COLSUM_LANES * COLSUM_ROW_LANES threads; threadIdx.x walks blockDim.x adjacent columns
// of dY (COLSUM_LANES, coalesced for C-ordered dY; for narrow dY the power of two that covers
// its columns, see cupy_launch.column_sum_launch), threadIdx.y walks the rows of the block's row
// split with stride blockDim.y (a power of two). Grid: (ceil(cols / blockDim.x), splits); split
// s sums rows [s * rows_per_split, (s + 1) * rows_per_split).
// The row lanes' sums are added by a tree in shared memory (a fixed order). With one split the
// block writes db directly. With several, each block stores its column sums in partials[s, col];
// the last block of a column tile to finish (counted with an atomic ticket in tile_counters)
// adds the partials in split order, so the result does not depend on block scheduling. The
// thread that draws the last ticket sets its counter back to 0: the counters are all zero again
// when the launch ends, so the host keeps one zeroed buffer per device and stream.
template <typename T>
__device__ void gradient_column_sums(const T* dY, index_t row_stride, index_t col_stride,
                                     const T* saved, index_t saved_row_stride,
                                     index_t saved_col_stride, int activation, T* G,
                                     index_t rows, index_t cols, index_t rows_per_split, T* db,
                                     int has_db, int accumulate,
                                     typename Accumulator<T>::type* partials,
                                     unsigned int* tile_counters)
{
    typedef typename Accumulator<T>::type acc_t;
    __shared__ acc_t lane_sums[COLSUM_ROW_LANES * COLSUM_LANES];
    __shared__ bool is_last_block;

    const int lane = threadIdx.x;
    const int row_lane = threadIdx.y;
    const int lanes = blockDim.x;
    const int row_lanes = blockDim.y;
    const index_t col = blockIdx.x * (index_t)lanes + lane;
    const index_t row_begin = blockIdx.y * rows_per_split;
    const index_t row_end = smaller(rows, row_begin + rows_per_split);

    acc_t sum = 0;
    if (col < cols) {
        const T* column = dY + col * col_stride;
        for (index_t row = row_begin + row_lane; row < row_end; row += row_lanes) {
            acc_t gradient = widen(column[row * row_stride]);
            if (activation != FASTLINEAR_ACT_NONE) {
                gradient = activation_grad(
                    activation, gradient,
                    widen(saved[row * saved_row_stride + col * saved_col_stride]));
                store_rounded(G + row * cols + col, gradient);
            }
            sum = plus(sum, gradient);
        }
    }
    if (!has_db) {
        return;  // the same for every thread: no barrier below is left waiting
    }
    lane_sums[row_lane * lanes + lane] = sum;
    __syncthreads();
    // Tree over the row lanes: lane sums at [0, half) take those at [half, 2 half); the reads
    // are of slots no thread writes in the same round. The total ends in row lane 0's sum.
    for (int half = row_lanes / 2; half > 0; half /= 2) {
        if (row_lane < half) {
            sum = plus(sum, lane_sums[(row_lane + half) * lanes + lane]);
            lane_sums[row_lane * lanes + lane] = sum;
        }
        __syncthreads();
    }

    if (gridDim.y == 1) {
        if (row_lane == 0 && col < cols) {
            store_rounded(db + col, accumulate ? plus(widen(db[col]), sum) : sum);
        }
        return;
    }

    if (row_lane == 0 && col < cols) {
        partials[blockIdx.y * cols + col] = sum;
        __threadfence();  // release: this thread's partial before the block's ticket
    }
    __syncthreads();
    if (lane == 0 && row_lane == 0) {
        // The ticket's thread fences too (the strict threadFenceReduction form): the partials it
        // saw through the barrier are visible device-wide before its atomicAdd.
        __threadfence();
        const unsigned int ticket = atomicAdd(tile_counters + blockIdx.x, 1u);
        is_last_block = (ticket == gridDim.y - 1);
        if (is_last_block) {
            tile_counters[blockIdx.x] = 0u;  // every other block of the tile has drawn its ticket
        }
    }
    __syncthreads();
    if (!is_last_block) {
        return;
    }
    __threadfence();  // acquire side: order the reads below after the other blocks' tickets
    if (row_lane == 0 && col < cols) {
        // volatile: read the other blocks' partials from L2, never from a stale L1 line
        const volatile acc_t* split_sums = partials;
        acc_t total = 0;
        for (unsigned int split = 0; split < gridDim.y; ++split) {
            total = plus(total, split_sums[split * cols + col]);
        }
        store_rounded(db + col, accumulate ? plus(widen(db[col]), total) : total);
    }
}

// ---------------------------------------------------------------------------------------------
// Y = act(X @ W + b) for a small batch (few rows of X), where a GEMM tiles poorly and the work is
// reading W once. Block: SMALL_BATCH_COLS x SMALL_BATCH_SLICES threads for a tile of
// SMALL_BATCH_ROWS rows x 32 columns of Y. threadIdx.x picks the column of W (a warp reads 32
// adjacent elements of a row of W); threadIdx.y picks a slice of the inner axis (k = slice,
// slice + 8, ...), so the 8 warps of a block split the inner axis between them. X is staged in
// shared memory SMALL_BATCH_CHUNK columns at a time; at the end the 8 slice sums are added in
// shared memory, and thread (x, y) finishes row y of the tile (bias, activation, store_output).
// Grid: (ceil(cols / 32), ceil(rows / 8)).

template <typename T>
__device__ void linear_forward_small_batch(const T* X, index_t x_row_stride,
                                           index_t x_col_stride, const T* W,
                                           index_t w_row_stride, index_t w_col_stride,
                                           const T* bias, index_t bias_stride, int has_bias,
                                           T* Y, index_t rows, index_t inner, index_t cols,
                                           int activation, T* Z, int write_z)
{
    static_assert(SMALL_BATCH_SLICES == SMALL_BATCH_ROWS, "the epilogue maps slice y to row y");
    typedef typename Accumulator<T>::type acc_t;
    __shared__ acc_t x_chunk[SMALL_BATCH_ROWS][SMALL_BATCH_CHUNK];
    __shared__ acc_t slice_sums[SMALL_BATCH_SLICES][SMALL_BATCH_ROWS][SMALL_BATCH_COLS];

    const int lane = threadIdx.x;
    const int slice = threadIdx.y;
    const int thread_id = slice * SMALL_BATCH_COLS + lane;
    const int block_threads = SMALL_BATCH_COLS * SMALL_BATCH_SLICES;
    const index_t col = blockIdx.x * (index_t)SMALL_BATCH_COLS + lane;
    const index_t row0 = blockIdx.y * (index_t)SMALL_BATCH_ROWS;

    acc_t acc[SMALL_BATCH_ROWS];
#pragma unroll
    for (int r = 0; r < SMALL_BATCH_ROWS; ++r) {
        acc[r] = 0;
    }

    for (index_t k0 = 0; k0 < inner; k0 += SMALL_BATCH_CHUNK) {
        // Stage X[row0 : row0 + 8, k0 : k0 + 256], zeros outside X; k is fastest so that a warp
        // reads adjacent elements of a C-ordered row of X.
        for (int e = thread_id; e < SMALL_BATCH_ROWS * SMALL_BATCH_CHUNK; e += block_threads) {
            const int r = e / SMALL_BATCH_CHUNK;
            const int k = e % SMALL_BATCH_CHUNK;
            const index_t row = row0 + r;
            const index_t kk = k0 + k;
            x_chunk[r][k] = (row < rows && kk < inner)
                                ? widen(X[row * x_row_stride + kk * x_col_stride])
                                : acc_t(0);
        }
        __syncthreads();
        if (col < cols) {
            const int chunk = (int)smaller(SMALL_BATCH_CHUNK, inner - k0);
            const T* w_column = W + k0 * w_row_stride + col * w_col_stride;
            // Unrolled so that each thread has several loads of W in flight: with few rows of X
            // the kernel is bound by how fast W streams in.
#pragma unroll 8
            for (int k = slice; k < chunk; k += SMALL_BATCH_SLICES) {
                const acc_t w = widen(w_column[k * w_row_stride]);
#pragma unroll
                for (int r = 0; r < SMALL_BATCH_ROWS; ++r) {
                    acc[r] = multiply_add(x_chunk[r][k], w, acc[r]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < SMALL_BATCH_ROWS; ++r) {
        slice_sums[slice][r][lane] = acc[r];
    }
    __syncthreads();
    const index_t row = row0 + slice;
    if (row < rows && col < cols) {
        acc_t total = 0;
#pragma unroll
        for (int s = 0; s < SMALL_BATCH_SLICES; ++s) {
            total = plus(total, slice_sums[s][slice][lane]);
        }
        if (has_bias) {
            total = plus(total, widen(bias[col * bias_stride]));
        }
        store_output(Y, Z, write_z, activation, row * cols + col, total);
    }
}

// ---------------------------------------------------------------------------------------------
// Y = act(X @ W + b) as a shared-memory tiled GEMM with bias and activation in the epilogue
// (one launch, one write of Y, and of Z when asked). Block tile: TILE_ROWS x TILE_COLS of Y,
// the inner axis walked TILE_DEPTH at a time. Threads: TILE_THREADS x TILE_THREADS; thread (x, y) owns the 4 x 4 outputs at rows
// y + 16 i and columns x + 16 j of the tile (strided, so that 16 adjacent threads store 16
// adjacent elements of a row of Y). Grid: (ceil(cols / 64), ceil(rows / 64)).
#define TILE_MICRO (TILE_ROWS / TILE_THREADS)

template <typename T>
__device__ void linear_forward_tiled(const T* X, index_t x_row_stride, index_t x_col_stride,
                                     const T* W, index_t w_row_stride, index_t w_col_stride,
                                     const T* bias, index_t bias_stride, int has_bias, T* Y,
                                     index_t rows, index_t inner, index_t cols, int activation,
                                     T* Z, int write_z)
{
    static_assert(TILE_ROWS == TILE_THREADS * TILE_MICRO && TILE_COLS == TILE_THREADS * TILE_MICRO,
                  "each thread owns TILE_MICRO x TILE_MICRO outputs");
    typedef typename Accumulator<T>::type acc_t;
    // The X tile is stored transposed (k-major) so the inner loop reads one row of it; the +1
    // pads the rows so that the transposing stores hit different banks.
    __shared__ acc_t x_tile[TILE_DEPTH][TILE_ROWS + 1];
    __shared__ acc_t w_tile[TILE_DEPTH][TILE_COLS];

    const int tx = threadIdx.x;
    const int ty = threadIdx.y;
    const int thread_id = ty * TILE_THREADS + tx;
    const int block_threads = TILE_THREADS * TILE_THREADS;
    const index_t row0 = blockIdx.y * (index_t)TILE_ROWS;
    const index_t col0 = blockIdx.x * (index_t)TILE_COLS;

    acc_t acc[TILE_MICRO][TILE_MICRO];
#pragma unroll
    for (int i = 0; i < TILE_MICRO; ++i) {
#pragma unroll
        for (int j = 0; j < TILE_MICRO; ++j) {
            acc[i][j] = 0;
        }
    }

    for (index_t k0 = 0; k0 < inner; k0 += TILE_DEPTH) {
        for (int e = thread_id; e < TILE_ROWS * TILE_DEPTH; e += block_threads) {
            // X tile: 64 rows x 16 k, k fastest (adjacent threads read along a row of X)
            const int r = e / TILE_DEPTH;
            const int k = e % TILE_DEPTH;
            const index_t row = row0 + r;
            const index_t kk = k0 + k;
            x_tile[k][r] = (row < rows && kk < inner)
                               ? widen(X[row * x_row_stride + kk * x_col_stride])
                               : acc_t(0);
        }
        for (int e = thread_id; e < TILE_DEPTH * TILE_COLS; e += block_threads) {
            // W tile: 16 k x 64 columns, column fastest (adjacent threads read along a row of W)
            const int k = e / TILE_COLS;
            const int c = e % TILE_COLS;
            const index_t kk = k0 + k;
            const index_t col = col0 + c;
            w_tile[k][c] = (kk < inner && col < cols)
                               ? widen(W[kk * w_row_stride + col * w_col_stride])
                               : acc_t(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < TILE_DEPTH; ++k) {
            acc_t x_values[TILE_MICRO];
            acc_t w_values[TILE_MICRO];
#pragma unroll
            for (int i = 0; i < TILE_MICRO; ++i) {
                x_values[i] = x_tile[k][ty + TILE_THREADS * i];
                w_values[i] = w_tile[k][tx + TILE_THREADS * i];
            }
#pragma unroll
            for (int i = 0; i < TILE_MICRO; ++i) {
#pragma unroll
                for (int j = 0; j < TILE_MICRO; ++j) {
                    acc[i][j] = multiply_add(x_values[i], w_values[j], acc[i][j]);
                }
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int j = 0; j < TILE_MICRO; ++j) {
        const index_t col = col0 + tx + TILE_THREADS * j;
        if (col >= cols) {
            continue;
        }
        const acc_t bias_value = has_bias ? widen(bias[col * bias_stride]) : acc_t(0);
#pragma unroll
        for (int i = 0; i < TILE_MICRO; ++i) {
            const index_t row = row0 + ty + TILE_THREADS * i;
            if (row < rows) {
                store_output(Y, Z, write_z, activation, row * cols + col,
                             plus(acc[i][j], bias_value));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per kernel and dtype.

#define FASTLINEAR_ROW_KERNELS(SUFFIX, T)                                                        \
    extern "C" __global__ void fill_rows_with_bias_##SUFFIX(                                     \
        T* Y, const T* bias, index_t bias_stride, index_t rows, index_t cols)                    \
    {                                                                                            \
        fill_rows_with_bias<T>(Y, bias, bias_stride, rows, cols);                                \
    }                                                                                            \
    extern "C" __global__ void bias_activation_epilogue_##SUFFIX(                                \
        T* Y, const T* bias, index_t bias_stride, int has_bias, int activation, T* Z,            \
        int write_z, index_t rows, index_t cols)                                                 \
    {                                                                                            \
        bias_activation_epilogue<T>(Y, bias, bias_stride, has_bias, activation, Z, write_z,      \
                                    rows, cols);                                                 \
    }                                                                                            \
    extern "C" __global__ void gradient_column_sums_##SUFFIX(                                    \
        const T* dY, index_t row_stride, index_t col_stride, const T* saved,                     \
        index_t saved_row_stride, index_t saved_col_stride, int activation, T* G, index_t rows,  \
        index_t cols, index_t rows_per_split, T* db, int has_db, int accumulate,                 \
        Accumulator<T>::type* partials, unsigned int* tile_counters)                             \
    {                                                                                            \
        gradient_column_sums<T>(dY, row_stride, col_stride, saved, saved_row_stride,             \
                                saved_col_stride, activation, G, rows, cols, rows_per_split, db, \
                                has_db, accumulate, partials, tile_counters);                    \
    }

#define FASTLINEAR_FORWARD_KERNEL(NAME, SUFFIX, T)                                               \
    extern "C" __global__ void NAME##_##SUFFIX(                                                  \
        const T* X, index_t x_row_stride, index_t x_col_stride, const T* W,                      \
        index_t w_row_stride, index_t w_col_stride, const T* bias, index_t bias_stride,          \
        int has_bias, T* Y, index_t rows, index_t inner, index_t cols, int activation, T* Z,     \
        int write_z)                                                                             \
    {                                                                                            \
        NAME<T>(X, x_row_stride, x_col_stride, W, w_row_stride, w_col_stride, bias, bias_stride, \
                has_bias, Y, rows, inner, cols, activation, Z, write_z);                         \
    }

#define FASTLINEAR_KERNELS(SUFFIX, T)                                                            \
    FASTLINEAR_ROW_KERNELS(SUFFIX, T)                                                            \
    FASTLINEAR_FORWARD_KERNEL(linear_forward_small_batch, SUFFIX, T)                             \
    FASTLINEAR_FORWARD_KERNEL(linear_forward_tiled, SUFFIX, T)

FASTLINEAR_KERNELS(f16, half_bits)
FASTLINEAR_KERNELS(f32, float)
FASTLINEAR_KERNELS(f64, double)
