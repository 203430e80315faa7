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
// The block shapes below are mirrored in fastlinear/backends/cupy.py (a test checks they agree).

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

// ---------------------------------------------------------------------------------------------
// Bias broadcast: Y[row, col] = b[col]. The output is then finished by cuBLAS with beta = 1
// (Y = X @ W + 1 * Y), so the bias costs one write pass and no separate read-modify-write pass.
// Block: BIAS_THREADS threads along columns; grid.x covers the columns, grid.y strides the rows,
// so each thread loads its bias element once and writes it down a column.
#define BIAS_THREADS 256

template <typename T>
__device__ void fill_rows_with_bias(T* Y, const T* bias, index_t bias_stride, index_t rows,
                                    index_t cols)
{
    const index_t col = blockIdx.x * (index_t)BIAS_THREADS + threadIdx.x;
    if (col >= cols) {
        return;
    }
    const T value = bias[col * bias_stride];
    for (index_t row = blockIdx.y; row < rows; row += gridDim.y) {
        Y[row * cols + col] = value;
    }
}

// Bias epilogue as a separate pass: Y[row, col] += b[col] (after a beta = 0 GEMM). Kept to
// compare with the broadcast + beta = 1 path (benchmarks/gpu_bench.py); same grid as above.
template <typename T>
__device__ void add_bias_to_rows(T* Y, const T* bias, index_t bias_stride, index_t rows,
                                 index_t cols)
{
    const index_t col = blockIdx.x * (index_t)BIAS_THREADS + threadIdx.x;
    if (col >= cols) {
        return;
    }
    const typename Accumulator<T>::type value = widen(bias[col * bias_stride]);
    for (index_t row = blockIdx.y; row < rows; row += gridDim.y) {
        T* target = Y + row * cols + col;
        store_rounded(target, widen(*target) + value);
    }
}

// ---------------------------------------------------------------------------------------------
// db = dY.sum(axis=0), one launch. Block: COLSUM_LANES x COLSUM_ROW_LANES threads; threadIdx.x
// walks 32 adjacent columns of dY (coalesced for C-ordered dY), threadIdx.y walks the rows of
// the block's row split with stride COLSUM_ROW_LANES. Grid: (ceil(cols / 32), splits); split s
// sums rows [s * rows_per_split, (s + 1) * rows_per_split).
// With one split the block writes db directly. With several, each block stores its column sums
// in partials[s, col]; the last block of a column tile to finish (counted with an atomic ticket
// in tile_counters, which must start at zero) adds the partials in split order, so the result
// does not depend on block scheduling, and resets its counter to zero.
#define COLSUM_LANES 32
#define COLSUM_ROW_LANES 8

template <typename T>
__device__ void column_sums(const T* dY, index_t row_stride, index_t col_stride, index_t rows,
                            index_t cols, index_t rows_per_split, T* db, int accumulate,
                            typename Accumulator<T>::type* partials, unsigned int* tile_counters)
{
    typedef typename Accumulator<T>::type acc_t;
    __shared__ acc_t lane_sums[COLSUM_ROW_LANES][COLSUM_LANES];
    __shared__ bool is_last_block;

    const int lane = threadIdx.x;
    const int row_lane = threadIdx.y;
    const index_t col = blockIdx.x * (index_t)COLSUM_LANES + lane;
    const index_t row_begin = blockIdx.y * rows_per_split;
    const index_t row_end = smaller(rows, row_begin + rows_per_split);

    acc_t sum = 0;
    if (col < cols) {
        const T* column = dY + col * col_stride;
        for (index_t row = row_begin + row_lane; row < row_end; row += COLSUM_ROW_LANES) {
            sum += widen(column[row * row_stride]);
        }
    }
    lane_sums[row_lane][lane] = sum;
    __syncthreads();
    if (row_lane == 0) {
        for (int other = 1; other < COLSUM_ROW_LANES; ++other) {
            sum += lane_sums[other][lane];
        }
    }

    if (gridDim.y == 1) {
        if (row_lane == 0 && col < cols) {
            store_rounded(db + col, accumulate ? widen(db[col]) + sum : sum);
        }
        return;
    }

    if (row_lane == 0 && col < cols) {
        partials[blockIdx.y * cols + col] = sum;
    }
    __threadfence();  // make this block's partials visible to the block that adds them up
    __syncthreads();
    if (lane == 0 && row_lane == 0) {
        const unsigned int ticket = atomicAdd(tile_counters + blockIdx.x, 1u);
        is_last_block = (ticket == gridDim.y - 1);
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
            total += split_sums[split * cols + col];
        }
        store_rounded(db + col, accumulate ? widen(db[col]) + total : total);
    }
    if (lane == 0 && row_lane == 0) {
        tile_counters[blockIdx.x] = 0;
    }
}

// ---------------------------------------------------------------------------------------------
// Y = X @ W + b for a small batch (few rows of X), where a GEMM tiles poorly and the work is
// reading W once. Block: SMALL_BATCH_COLS x SMALL_BATCH_SLICES threads for a tile of
// SMALL_BATCH_ROWS rows x 32 columns of Y. threadIdx.x picks the column of W (a warp reads 32
// adjacent elements of a row of W); threadIdx.y picks a slice of the inner axis (k = slice,
// slice + 8, ...), so the 8 warps of a block split the inner axis between them. X is staged in
// shared memory SMALL_BATCH_CHUNK columns at a time; at the end the 8 slice sums are added in
// shared memory, and thread (x, y) finishes row y of the tile with the bias.
// Grid: (ceil(cols / 32), ceil(rows / 8)).
#define SMALL_BATCH_ROWS 8
#define SMALL_BATCH_COLS 32
#define SMALL_BATCH_SLICES 8
#define SMALL_BATCH_CHUNK 256

template <typename T>
__device__ void linear_forward_small_batch(const T* X, index_t x_row_stride,
                                           index_t x_col_stride, const T* W,
                                           index_t w_row_stride, index_t w_col_stride,
                                           const T* bias, index_t bias_stride, int has_bias,
                                           T* Y, index_t rows, index_t inner, index_t cols)
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
                    acc[r] += x_chunk[r][k] * w;
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
            total += slice_sums[s][slice][lane];
        }
        if (has_bias) {
            total += widen(bias[col * bias_stride]);
        }
        store_rounded(Y + row * cols + col, total);
    }
}

// ---------------------------------------------------------------------------------------------
// Y = X @ W + b as a shared-memory tiled GEMM with the bias added in the epilogue (one launch,
// one write of Y). Block tile: TILE_ROWS x TILE_COLS of Y, the inner axis walked TILE_DEPTH at
// a time. Threads: TILE_THREADS x TILE_THREADS; thread (x, y) owns the 4 x 4 outputs at rows
// y + 16 i and columns x + 16 j of the tile (strided, so that 16 adjacent threads store 16
// adjacent elements of a row of Y). Grid: (ceil(cols / 64), ceil(rows / 64)).
#define TILE_ROWS 64
#define TILE_COLS 64
#define TILE_DEPTH 16
#define TILE_THREADS 16
#define TILE_MICRO 4

template <typename T>
__device__ void linear_forward_tiled(const T* X, index_t x_row_stride, index_t x_col_stride,
                                     const T* W, index_t w_row_stride, index_t w_col_stride,
                                     const T* bias, index_t bias_stride, int has_bias, T* Y,
                                     index_t rows, index_t inner, index_t cols)
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
                    acc[i][j] += x_values[i] * w_values[j];
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
                store_rounded(Y + row * cols + col, acc[i][j] + bias_value);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// extern "C" entry points, one per kernel and dtype.

#define FASTLINEAR_BIAS_KERNELS(SUFFIX, T)                                                       \
    extern "C" __global__ void fill_rows_with_bias_##SUFFIX(                                     \
        T* Y, const T* bias, index_t bias_stride, index_t rows, index_t cols)                    \
    {                                                                                            \
        fill_rows_with_bias<T>(Y, bias, bias_stride, rows, cols);                                \
    }                                                                                            \
    extern "C" __global__ void add_bias_to_rows_##SUFFIX(                                        \
        T* Y, const T* bias, index_t bias_stride, index_t rows, index_t cols)                    \
    {                                                                                            \
        add_bias_to_rows<T>(Y, bias, bias_stride, rows, cols);                                   \
    }                                                                                            \
    extern "C" __global__ void column_sums_##SUFFIX(                                             \
        const T* dY, index_t row_stride, index_t col_stride, index_t rows, index_t cols,         \
        index_t rows_per_split, T* db, int accumulate, Accumulator<T>::type* partials,           \
        unsigned int* tile_counters)                                                             \
    {                                                                                            \
        column_sums<T>(dY, row_stride, col_stride, rows, cols, rows_per_split, db, accumulate,   \
                       partials, tile_counters);                                                 \
    }

#define FASTLINEAR_FORWARD_KERNEL(NAME, SUFFIX, T)                                               \
    extern "C" __global__ void NAME##_##SUFFIX(                                                  \
        const T* X, index_t x_row_stride, index_t x_col_stride, const T* W,                      \
        index_t w_row_stride, index_t w_col_stride, const T* bias, index_t bias_stride,          \
        int has_bias, T* Y, index_t rows, index_t inner, index_t cols)                           \
    {                                                                                            \
        NAME<T>(X, x_row_stride, x_col_stride, W, w_row_stride, w_col_stride, bias, bias_stride, \
                has_bias, Y, rows, inner, cols);                                                 \
    }

#define FASTLINEAR_KERNELS(SUFFIX, T)                                                            \
    FASTLINEAR_BIAS_KERNELS(SUFFIX, T)                                                           \
    FASTLINEAR_FORWARD_KERNEL(linear_forward_small_batch, SUFFIX, T)                             \
    FASTLINEAR_FORWARD_KERNEL(linear_forward_tiled, SUFFIX, T)

FASTLINEAR_KERNELS(f16, half_bits)
FASTLINEAR_KERNELS(f32, float)
FASTLINEAR_KERNELS(f64, double)
