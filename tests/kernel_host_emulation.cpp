// Runs fastlinear's CUDA kernels on the CPU, for tests on machines without a GPU.
//
// tests/test_kernels_emulated.py compiles this file with g++ into a shared library, with
// FASTLINEAR_KERNELS_FILE naming a copy of kernels/linear.cu whose two PTX conversions
// (float16 <-> float32) were replaced by the host functions below, and the kernels' -D defines. A launch runs
// blockDim.x * blockDim.y std::threads that meet at a real barrier in __syncthreads(); they
// run the blocks one after another. __shared__ variables become function statics, shared by the
// threads of the running block. This checks indexing, bounds, barriers and the last-block
// protocol of the kernels, not their speed or their behaviour under concurrent blocks.

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

struct dim3 {
    unsigned int x, y, z;
};

static dim3 blockDim, gridDim;
static thread_local dim3 blockIdx, threadIdx;

class BlockBarrier {
public:
    explicit BlockBarrier(unsigned int count) : count_(count) {}
    void arrive_and_wait()
    {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long long generation = generation_;
        if (++arrived_ == count_) {
            arrived_ = 0;
            ++generation_;
            changed_.notify_all();
        } else {
            changed_.wait(lock, [&] { return generation_ != generation; });
        }
    }

private:
    std::mutex mutex_;
    std::condition_variable changed_;
    unsigned int count_;
    unsigned int arrived_ = 0;
    unsigned long long generation_ = 0;
};

static BlockBarrier* block_barrier = nullptr;

static void __syncthreads() { block_barrier->arrive_and_wait(); }
static void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static unsigned int atomicAdd(unsigned int* address, unsigned int value)
{
    return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
}

static float fastlinear_host_half_to_float(unsigned short bits)
{
    const float sign = (bits & 0x8000) ? -1.0f : 1.0f;
    const int exponent = (bits >> 10) & 0x1f;
    const int mantissa = bits & 0x3ff;
    if (exponent == 0) {
        return sign * std::ldexp(static_cast<float>(mantissa), -24);
    }
    if (exponent == 31) {
        return mantissa ? NAN : sign * INFINITY;
    }
    return sign * std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
}

static unsigned short fastlinear_host_float_to_half(float value)
{
    // Round to nearest even, as cvt.rn.f16.f32: scaling by powers of two is exact, so the
    // one rounding is nearbyint's (the default rounding mode is to nearest even).
    const unsigned short sign = std::signbit(value) ? 0x8000 : 0;
    const double magnitude = std::fabs(static_cast<double>(value));
    if (std::isnan(value)) {
        return 0x7e00;
    }
    if (std::isinf(value)) {
        return sign | 0x7c00;
    }
    if (magnitude < std::ldexp(1.0, -14)) {  // subnormal (or rounds up to the smallest normal)
        return sign | static_cast<unsigned short>(std::nearbyint(std::ldexp(magnitude, 24)));
    }
    int exponent;
    std::frexp(magnitude, &exponent);  // magnitude = m * 2^exponent, m in [0.5, 1)
    exponent -= 1;                     // magnitude = (1 + f) * 2^exponent
    double mantissa = std::nearbyint((std::ldexp(magnitude, -exponent) - 1.0) * 1024.0);
    if (mantissa == 1024.0) {
        mantissa = 0.0;
        exponent += 1;
    }
    if (exponent + 15 >= 31) {
        return sign | 0x7c00;
    }
    return sign | static_cast<unsigned short>(((exponent + 15) << 10) |
                                              static_cast<int>(mantissa));
}

// CUDA's IEEE fused multiply-add (it ignores -ftz): the C++ one rounds once as well.
static float __fmaf_ieee_rn(float a, float b, float c) { return std::fma(a, b, c); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

#include FASTLINEAR_KERNELS_FILE

template <typename... Args, std::size_t... I>
static void call_with(void (*kernel)(Args...), void** args, std::index_sequence<I...>)
{
    kernel(*static_cast<Args*>(args[I])...);
}

template <typename... Args>
static void run_grid(void (*kernel)(Args...), unsigned int grid_x, unsigned int grid_y,
                     unsigned int block_x, unsigned int block_y, void** args)
{
    // One CPU thread per CUDA thread of a block; the same threads run every block in turn and
    // meet at the barrier after each, so no thread touches the next block's shared memory early.
    gridDim = {grid_x, grid_y, 1};
    blockDim = {block_x, block_y, 1};
    BlockBarrier barrier(block_x * block_y);
    block_barrier = &barrier;
    std::vector<std::thread> threads;
    for (unsigned int ty = 0; ty < block_y; ++ty) {
        for (unsigned int tx = 0; tx < block_x; ++tx) {
            threads.emplace_back([=, &barrier] {
                threadIdx = {tx, ty, 0};
                for (unsigned int by = 0; by < grid_y; ++by) {
                    for (unsigned int bx = 0; bx < grid_x; ++bx) {
                        blockIdx = {bx, by, 0};
                        call_with(kernel, args, std::index_sequence_for<Args...>{});
                        barrier.arrive_and_wait();
                    }
                }
            });
        }
    }
    for (std::thread& thread : threads) {
        thread.join();
    }
}

#define EMULATED(NAME)                                                                           \
    if (std::strcmp(name, #NAME) == 0) {                                                         \
        run_grid(NAME, grid_x, grid_y, block_x, block_y, args);                                  \
        return 0;                                                                                \
    }
#define EMULATED_DTYPES(KERNEL) EMULATED(KERNEL##_f16) EMULATED(KERNEL##_f32) EMULATED(KERNEL##_f64)

// Launch kernel `name` like cuLaunchKernel: `args` points at each argument. Returns 0, or -1
// for an unknown name.
extern "C" int emulate_launch(const char* name, unsigned int grid_x, unsigned int grid_y,
                              unsigned int block_x, unsigned int block_y, void** args)
{
    EMULATED_DTYPES(fill_rows_with_bias)
    EMULATED_DTYPES(bias_activation_epilogue)
    EMULATED_DTYPES(gradient_column_sums)
    EMULATED_DTYPES(linear_forward_small_batch)
    EMULATED_DTYPES(linear_forward_tiled)
    return -1;
}
