//! The buffer pool: tensor storage reused across training steps instead of allocated.
//!
//! Every op writes a fresh output tensor, so a MiniLM training step at batch 8 x 64 made
//! about 4000 activation-sized allocations (266 MiB) and as many frees. With the system
//! allocator each large one is an `mmap` whose pages the kernel zeroes on first touch;
//! with mimalloc told to keep freed pages (`lora`'s binary and the benches) the pages stay,
//! but the resident set grows past the live peak because freed blocks of one size do not
//! always serve the next request of another. Here a dropped [`NdTensor`](crate::NdTensor)
//! whose storage nobody else shares returns its buffer, and the next op that needs a
//! buffer of that length (or a little less) takes it back. A steady-state step, whose ops
//! ask for the same lengths in the same order every time, then allocates no tensor storage
//! at all (`tests/step_allocations.rs` counts it).
//!
//! Only buffers of lengths some op has asked for are kept: storage made elsewhere and
//! wrapped as a tensor (a weight block widened from bf16, say) goes back to the allocator.
//!
//! Bounded: the free buffers never exceed the most storage that was ever handed out and
//! not yet returned (the process's own live peak, at least [`MIN_LIMIT_BYTES`]), or the
//! limit set with [`set_limit`]. Over it, the buffers returned longest ago are freed
//! first, so lengths a workload stopped asking for (a KV cache that grew past them) do
//! not stay resident. [`release`] frees everything held.
//!
//! A buffer from `take_for_overwrite` holds stale values of an earlier tensor (always
//! initialised floats, never uninitialised memory): it is for outputs that the op then
//! writes completely, which also saves the zero-fill pass `vec![0.0; n]` makes on reused
//! memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Buffers of fewer elements go straight to the allocator, whose small-object caches
/// already serve them fast (4 KiB: one page).
pub(crate) const MIN_POOLED_ELEMS: usize = 1024;
/// At most this many distinct requested lengths are remembered (a generation loop asks for
/// a new length every token); past it the record starts over.
const MAX_REQUESTED_LENGTHS: usize = 4096;
/// The least the pool may hold however small the live peak has been.
pub const MIN_LIMIT_BYTES: usize = 64 << 20;
/// A request takes a free buffer up to this much longer than it needs (1/4 slack): a
/// freed activation then serves a slightly shorter gradient instead of a new allocation.
const SLACK_DIV: usize = 4;

struct Pool {
    /// Free buffers by capacity; each entry's list holds (return stamp, buffer), oldest
    /// first. Empty lists are kept so that the steady state inserts no tree nodes.
    free: BTreeMap<usize, Vec<(u64, Vec<f32>)>>,
    free_bytes: usize,
    /// Lengths requested so far: a returned buffer no request could take is freed.
    requested: BTreeSet<usize>,
    /// Bytes handed out by `take_*` and not yet given back.
    outstanding: usize,
    peak_outstanding: usize,
    /// A limit set by the user, in place of the live-peak rule.
    fixed_limit: Option<usize>,
    clock: u64,
    stats: PoolStats,
}

/// Counters since the process started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Requests served from the pool.
    pub reused: u64,
    /// Requests that had to allocate.
    pub allocated: u64,
    /// Buffers freed to keep the pool under its limit.
    pub evicted: u64,
    /// Bytes the pool holds now.
    pub free_bytes: usize,
    /// Bytes the frozen weights' packed copies hold now (kept for our GEMM's tiles beside
    /// the weights, up to [`set_kept_panel_limit`]; not pool buffers).
    pub kept_panel_bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    free: BTreeMap::new(),
    free_bytes: 0,
    requested: BTreeSet::new(),
    outstanding: 0,
    peak_outstanding: 0,
    fixed_limit: None,
    clock: 0,
    stats: PoolStats {
        reused: 0,
        allocated: 0,
        evicted: 0,
        free_bytes: 0,
        kept_panel_bytes: 0,
    },
});

fn lock() -> std::sync::MutexGuard<'static, Pool> {
    // The pool's state stays consistent across a panic (every update is one assignment
    // after the fallible work), so a poisoned lock is still usable.
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const F32: usize = std::mem::size_of::<f32>();

impl Pool {
    fn limit(&self) -> usize {
        self.fixed_limit
            .unwrap_or(self.peak_outstanding.max(MIN_LIMIT_BYTES))
    }

    /// The smallest free buffer of at least `len` elements and at most the slack more.
    fn pop(&mut self, len: usize) -> Option<Vec<f32>> {
        let max = len + len / SLACK_DIV;
        let (_, list) = self
            .free
            .range_mut(len..=max)
            .find(|(_, list)| !list.is_empty())?;
        let (_, buf) = list.pop()?;
        self.free_bytes -= buf.capacity() * F32;
        Some(buf)
    }

    fn handed_out(&mut self, bytes: usize) {
        self.outstanding += bytes;
        self.peak_outstanding = self.peak_outstanding.max(self.outstanding);
    }

    /// Frees the buffers returned longest ago until the pool is under its limit.
    fn evict(&mut self) {
        let limit = self.limit();
        while self.free_bytes > limit {
            let oldest = self
                .free
                .iter()
                .filter_map(|(&cap, list)| list.first().map(|&(stamp, _)| (stamp, cap)))
                .min();
            let Some((_, cap)) = oldest else { break };
            let Some(list) = self.free.get_mut(&cap) else {
                break;
            };
            let (_, buf) = list.remove(0);
            self.free_bytes -= buf.capacity() * F32;
            self.stats.evicted += 1;
            drop(buf);
        }
    }
}

/// A buffer of `len` elements whose values are unspecified (stale floats from an earlier
/// tensor): for outputs the caller overwrites completely. Builds with debug assertions
/// (`cargo test` without `--release`) fill it with NaN, so that a kernel that leaves an
/// element unwritten fails its parity tests instead of passing on stale values that
/// happened to be right.
pub(crate) fn take_for_overwrite(len: usize) -> Vec<f32> {
    let mut buf = take_stale(len);
    if cfg!(debug_assertions) {
        buf.fill(f32::NAN);
    }
    buf
}

/// [`take_for_overwrite`]'s buffer, stale values as found.
fn take_stale(len: usize) -> Vec<f32> {
    if len < MIN_POOLED_ELEMS {
        return vec![0.0; len];
    }
    let mut pool = lock();
    if pool.requested.len() >= MAX_REQUESTED_LENGTHS {
        pool.requested.clear();
    }
    pool.requested.insert(len);
    let found = pool.pop(len);
    match found {
        Some(mut buf) => {
            pool.stats.reused += 1;
            pool.handed_out(buf.capacity() * F32);
            drop(pool);
            // Shortening keeps the capacity (a later return files it under its full size);
            // lengthening within the capacity writes once, only when no exact fit was free.
            buf.resize(len, 0.0);
            buf
        }
        None => {
            pool.stats.allocated += 1;
            pool.handed_out(len * F32);
            drop(pool);
            // Fresh memory from `calloc` is zero without a pass over it.
            vec![0.0; len]
        }
    }
}

/// A buffer of `len` zeros.
pub(crate) fn zeros(len: usize) -> Vec<f32> {
    let mut buf = take_stale(len);
    buf.fill(0.0);
    buf
}

/// A buffer holding a copy of `src`.
pub(crate) fn copy_of(src: &[f32]) -> Vec<f32> {
    let mut buf = take_stale(src.len());
    buf.copy_from_slice(src);
    buf
}

/// Takes back a buffer nobody uses any more (small ones are simply freed).
pub(crate) fn give(buf: Vec<f32>) {
    let cap = buf.capacity();
    if cap < MIN_POOLED_ELEMS {
        return;
    }
    let mut pool = lock();
    pool.outstanding = pool.outstanding.saturating_sub(cap * F32);
    // Only a buffer some request could take stays: a request of `len` takes capacities up
    // to `len + len / SLACK_DIV`. Others (a host buffer wrapped as a tensor, such as a
    // weight block widened from bf16, made outside the pool) go back to the allocator
    // instead of piling up here.
    let shortest = (cap * SLACK_DIV).div_ceil(SLACK_DIV + 1);
    if pool.requested.range(shortest..=cap).next().is_none() {
        drop(pool);
        drop(buf);
        return;
    }
    pool.clock += 1;
    let stamp = pool.clock;
    pool.free_bytes += cap * F32;
    pool.free.entry(cap).or_default().push((stamp, buf));
    pool.evict();
}

/// Caps the bytes the pool keeps (`None`: the live-peak rule of the module docs).
/// Lowering it frees buffers at once.
pub fn set_limit(bytes: Option<usize>) {
    let mut pool = lock();
    pool.fixed_limit = bytes;
    pool.evict();
}

/// Caps the bytes of the frozen weights' packed copies (`PoolStats::kept_panel_bytes`):
/// a weight used twice as a product's `B` is packed once for our GEMM and kept beside
/// it, which saves each product's packing (2% of an AVX-512 MiniLM training step) and
/// costs up to two more copies of every frozen weight (MiniLM's: 79 MiB). The default is
/// `LORA_NDARRAY_PACKED_MB` megabytes if set, else 0 (off). Copies made already stay until
/// their weights are dropped or written.
pub fn set_kept_panel_limit(bytes: usize) {
    crate::sgemm::set_budget_bytes(bytes);
}

/// Whether the backend's own GEMM kernels run this process's products: x86-64 with AVX2
/// and FMA, unless `LORA_NDARRAY_ISA=none` turns them off (read once per process). Only
/// they keep weight panels (`set_kept_panel_limit`) and pack into buffers they reuse;
/// elsewhere the `gemm` crate runs every product, with scratch memory per call.
pub fn own_kernels() -> bool {
    crate::sgemm::available()
}

/// The f32 lanes of the vector FMAs the backend's own kernels run in this process: 16
/// (AVX-512: `avx512f`, `bw`, `dq` and `vl`), 8 (AVX2 and FMA) or `None` where the `gemm`
/// crate runs every product, after `LORA_NDARRAY_ISA`'s cap (read once per process). The
/// benchmarks measure the machine's FMA peak at this width.
pub fn kernel_lanes() -> Option<usize> {
    crate::sgemm::isa().map(|isa| match isa {
        crate::sgemm::Isa::Avx2 => 8,
        crate::sgemm::Isa::Avx512 => 16,
    })
}

/// Frees every buffer the pool holds (for example after training, before serving).
pub fn release() {
    let mut pool = lock();
    let free = std::mem::take(&mut pool.free);
    pool.free_bytes = 0;
    pool.requested.clear();
    drop(pool);
    drop(free);
}

/// The pool's counters.
pub fn stats() -> PoolStats {
    let pool = lock();
    PoolStats {
        free_bytes: pool.free_bytes,
        kept_panel_bytes: crate::sgemm::kept_panel_bytes(),
        ..pool.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test touches the process-wide pool, so that no other test's buffers interleave.
    #[test]
    fn reuses_fits_within_slack_and_stays_under_its_limit() {
        release();
        let a = take_for_overwrite(10_000);
        let ptr = a.as_ptr();
        give(a);
        // The same length gets the same buffer back, stale values and all.
        let b = take_for_overwrite(10_000);
        assert_eq!(b.as_ptr(), ptr);
        give(b);
        // A slightly shorter request takes it too; a much shorter or longer one does not.
        let c = take_for_overwrite(9_000);
        assert_eq!((c.as_ptr(), c.len()), (ptr, 9_000));
        give(c);
        let (shorter, longer) = (take_for_overwrite(5_000), take_for_overwrite(20_000));
        assert_ne!(shorter.as_ptr(), ptr);
        assert_ne!(longer.as_ptr(), ptr);
        drop((shorter, longer));
        assert!(zeros(10_000).iter().all(|&v| v == 0.0));
        // A buffer of a length nobody asked for is not kept.
        let before = stats().free_bytes;
        give(vec![1.0; 77_777]);
        assert_eq!(stats().free_bytes, before);
        // Over a fixed limit the oldest buffers go first.
        set_limit(Some(3 * 4 * 4096));
        let bufs: Vec<_> = (0..5).map(|_| take_for_overwrite(4096)).collect();
        let newest = bufs[4].as_ptr();
        bufs.into_iter().for_each(give);
        let s = stats();
        assert!(s.free_bytes <= 3 * 4 * 4096, "{s:?}");
        assert!(s.evicted >= 2, "{s:?}");
        let again = take_for_overwrite(4096);
        assert_eq!(again.as_ptr(), newest);
        drop(again);
        set_limit(None);
        release();
        assert_eq!(stats().free_bytes, 0);
    }

    /// The lanes the benchmarks measure the FMA peak at are those of kernels that run:
    /// none without them, never 16 on a CPU that lacks one of the AVX-512 subsets, never
    /// 8 without AVX2 and FMA.
    #[test]
    fn kernel_lanes_are_those_of_kernels_that_run() {
        let lanes = kernel_lanes();
        assert_eq!(lanes.is_some(), own_kernels());
        assert!(matches!(lanes, None | Some(8) | Some(16)), "{lanes:?}");
        #[cfg(target_arch = "x86_64")]
        if lanes == Some(16) {
            for feature in [
                is_x86_feature_detected!("avx512f"),
                is_x86_feature_detected!("avx512bw"),
                is_x86_feature_detected!("avx512dq"),
                is_x86_feature_detected!("avx512vl"),
            ] {
                assert!(
                    feature,
                    "16 lanes without every AVX-512 subset the kernels use"
                );
            }
        }
        #[cfg(target_arch = "x86_64")]
        if lanes == Some(8) {
            assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        }
    }
}
