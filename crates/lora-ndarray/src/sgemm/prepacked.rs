//! A product's `B` operand packed once and kept with its tensor: the frozen weights of a
//! LoRA model, which every training step multiplies twice (`x Wᵀ` forward, `dy W`
//! backward) and which never change.
//!
//! Why: under a row split each thread packs all of `B` for every product (the blocking
//! loops in `mod.rs`), and packing `W` and `Wᵀ` was about 2% of the AVX-512 MiniLM training
//! step's samples (stop 34, docs/performance/stops-32-35.md). Packed once, the tiles read
//! the kept panels directly.
//!
//! Which tensors: a tensor's second (or later) use as `B`, transposed or not
//! ([`PackSlots`]), so nothing is packed for an activation used once, and no caller has to
//! say what is a weight. What it costs: a copy of each such weight per way it is used (the
//! two of them triple a dense model's weight memory), bounded by a process-wide budget ([`budget_bytes`]:
//! `lora::ndarray_pool::set_kept_panel_limit`, `LORA_NDARRAY_PACKED_MB`), which is 0 by
//! default (see [`DEFAULT_BUDGET_MB`]); past it, products pack as before. A write to the
//! tensor drops its packed copies (`NdTensor::as_mut_slice`).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use lora_core::backend::Transpose;

use super::pack::{At, pack_b};
use super::{Isa, Kernel, Operand, avx2, avx512, isa};

/// The default budget for packed copies: none. They are a trade the user makes: MiniLM's
/// take 79 MiB (both layouts of its 36 linear weights) for 2% of an AVX-512 training step,
/// but the issue-shape decoder (hidden 1024, vocabulary 32000) peaked at 1387 MiB without
/// them, 1529 MiB with 96 MiB of them and 1954 MiB with 512, against PyTorch's 1470
/// (docs/performance/stops-32-35.md, stop 34): no default budget both helps and keeps a
/// larger model's peak under PyTorch's.
const DEFAULT_BUDGET_MB: usize = 0;

/// Bytes held by packed copies now, across the process.
static HELD: AtomicUsize = AtomicUsize::new(0);

/// The budget in bytes, [`UNSET`] until first read or set.
static BUDGET: AtomicUsize = AtomicUsize::new(UNSET);
const UNSET: usize = usize::MAX;

/// The most bytes packed copies may hold: what [`set_budget_bytes`] set, else
/// `LORA_NDARRAY_PACKED_MB` megabytes (0 turns them off), else [`DEFAULT_BUDGET_MB`].
pub(crate) fn budget_bytes() -> usize {
    let set = BUDGET.load(Relaxed);
    if set != UNSET {
        return set;
    }
    let mb = match std::env::var("LORA_NDARRAY_PACKED_MB") {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!(
                "lora-ndarray: LORA_NDARRAY_PACKED_MB={v:?} is not a whole number of MB; \
                 using {DEFAULT_BUDGET_MB}"
            );
            DEFAULT_BUDGET_MB
        }),
        Err(_) => DEFAULT_BUDGET_MB,
    };
    // A concurrent `set_budget_bytes` wins over the environment.
    let bytes = mb.saturating_mul(1 << 20).min(UNSET - 1);
    match BUDGET.compare_exchange(UNSET, bytes, Relaxed, Relaxed) {
        Ok(_) => bytes,
        Err(set) => set,
    }
}

/// Sets the budget (overriding `LORA_NDARRAY_PACKED_MB`). Copies made already stay until
/// their tensors are dropped or written; later ones are made only within the new budget.
pub(crate) fn set_budget_bytes(bytes: usize) {
    BUDGET.store(bytes.min(UNSET - 1), Relaxed);
}

/// Bytes the packed copies hold now (what the budget counts).
pub(crate) fn kept_panel_bytes() -> usize {
    HELD.load(Relaxed)
}

/// A `k x n` operand in the panels a kernel's tile reads: for each depth slice (of
/// `kc`, the kernel's [`slice_depth`](super::slice_depth) for `k`),
/// all of its panels of `NR` columns (`kc` steps of `NR` values each; columns past `n`
/// zero). Not blocked by `NC` columns as per-call packing is: a column panel of a product
/// starting at any multiple of `NR` finds its panels in place.
pub(crate) struct PackedB {
    data: Vec<f32>,
    k: usize,
    n: usize,
    nr: usize,
    kc: usize,
}

impl PackedB {
    /// `b` packed for this CPU's kernel, if our kernels run here and the budget has room.
    ///
    /// # Safety
    /// `b`'s `k x n` elements are addressable.
    unsafe fn new(b: Operand, k: usize, n: usize) -> Option<Self> {
        // SAFETY: forwarded.
        unsafe {
            match isa()? {
                Isa::Avx512 => Self::for_kernel::<avx512::Avx512>(b, k, n),
                Isa::Avx2 => Self::for_kernel::<avx2::Avx2>(b, k, n),
            }
        }
    }

    /// `b` packed for kernel `K`'s tiles, if the budget has room.
    ///
    /// # Safety
    /// `b`'s `k x n` elements are addressable.
    pub(super) unsafe fn for_kernel<K: Kernel>(b: Operand, k: usize, n: usize) -> Option<Self> {
        let (nr, kc) = (K::NR, super::slice_depth::<K>(k));
        let len = k * width(n, nr);
        let bytes = len * size_of::<f32>();
        if HELD.fetch_add(bytes, Relaxed) + bytes > budget_bytes() {
            HELD.fetch_sub(bytes, Relaxed);
            return None;
        }
        let mut data = vec![0.0; len];
        for pc in (0..k).step_by(kc) {
            let kc1 = kc.min(k - pc);
            let at = pc * width(n, nr);
            // SAFETY: row pc lies in b; the slice's panels fit from `at` (`len`).
            unsafe { pack_b(nr, kc1, n, b.at(pc, 0), (&mut data[at..], kc1, 0)) };
        }
        Some(Self { data, k, n, nr, kc })
    }

    /// Whether kernel `K`'s tiles can read columns `col..col + n` of a `k`-deep operand
    /// from these panels.
    pub(super) fn fits<K: Kernel>(&self, k: usize, (col, n): (usize, usize)) -> bool {
        let same_slices = self.kc == super::slice_depth::<K>(k);
        (self.k, self.nr) == (k, K::NR) && same_slices && col % K::NR == 0 && col + n <= self.n
    }

    /// The panels from column `col` (a multiple of `NR`) of the depth slice from `pc` (a
    /// multiple of `kc`): `min(kc, k - pc)` steps each, one after another.
    pub(super) fn panels(&self, pc: usize, col: usize) -> &[f32] {
        let kc1 = self.kc.min(self.k - pc);
        &self.data[pc * width(self.n, self.nr) + col * kc1..]
    }
}

impl Drop for PackedB {
    fn drop(&mut self) {
        HELD.fetch_sub(self.data.len() * size_of::<f32>(), Relaxed);
    }
}

/// `nc` columns rounded up to whole panels of `nr`.
fn width(nc: usize, nr: usize) -> usize {
    nc.div_ceil(nr) * nr
}

/// A tensor's packed copies, one per way it enters a product as `B` (as itself, `dy W`;
/// transposed, `x Wᵀ`), each made at a use after the layout's
/// first while the budget has room (a use without room leaves the slot empty, so a copy
/// comes once the limit is raised). Clones of a tensor share its storage and so its
/// copies; a write gives it new slots.
#[derive(Default)]
pub(crate) struct PackSlots {
    /// `[as itself, transposed]`.
    slots: [Slot; 2],
}

#[derive(Default)]
struct Slot {
    /// Whether the tensor has entered a product in this layout before.
    used: AtomicBool,
    /// The copy, once made.
    packed: OnceLock<Arc<PackedB>>,
}

impl Clone for PackSlots {
    fn clone(&self) -> Self {
        let slot = |s: &Slot| Slot {
            used: AtomicBool::new(s.used.load(Relaxed)),
            packed: s.packed.clone(),
        };
        Self {
            slots: [slot(&self.slots[0]), slot(&self.slots[1])],
        }
    }
}

impl std::fmt::Debug for PackSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = |s: &Slot| s.packed.get().is_some();
        f.debug_struct("PackSlots")
            .field("as_itself", &held(&self.slots[0]))
            .field("transposed", &held(&self.slots[1]))
            .finish()
    }
}

impl PackSlots {
    /// The packed copy of `b` (the tensor these slots belong to, transposed or not as `t`
    /// says: a `k x n` operand) for this use, made now if this is not its first use and the
    /// budget has room; `None` on a first use or where there is no copy.
    ///
    /// # Safety
    /// `b` addresses this tensor's elements as a `k x n` operand (transposed as `t`), and the
    /// tensor's elements have not changed since these slots were made.
    pub(crate) unsafe fn for_use(
        &self,
        t: Transpose,
        b: Operand,
        (k, n): (usize, usize),
    ) -> Option<&PackedB> {
        let slot = &self.slots[usize::from(t == Transpose::Yes)];
        if let Some(kept) = slot.packed.get() {
            return Some(kept);
        }
        if !slot.used.swap(true, Relaxed) || budget_bytes() == 0 {
            return None;
        }
        // SAFETY: forwarded to the caller's contract.
        let made = unsafe { PackedB::new(b, k, n) }?;
        // Where another thread set it first, this copy is dropped (and uncounted).
        let _ = slot.packed.set(Arc::new(made));
        slot.packed.get().map(|kept| &**kept)
    }
}
