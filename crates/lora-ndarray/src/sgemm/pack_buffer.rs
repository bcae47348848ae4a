//! The packing buffers' memory: an anonymous mapping on 2 MiB boundaries that asks Linux
//! for transparent huge pages (`MADV_HUGEPAGE`).
//!
//! Why: a packed block of `B` is about 7 MiB on the AVX-512 tile, and the tile streams a 96
//! KiB panel of it per output tile, with the `A` panel and eight rows of `C` beside it. In
//! 4 KiB pages that is dozens of TLB entries per tile, and each miss under a VM's nested
//! paging walks two page tables. Most distributions leave huge pages to `madvise`
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`), so a plain `Vec` gets none.
//! Measured on the 2-core Xeon VM, one thread, alternating with the `Vec` build
//! (docs/performance/stops-29-31.md, stop 30).
//!
//! Where the mapping or the advice fails (another OS, huge pages off), the buffer is
//! still correct memory, only in small pages; a failed mapping falls back to a `Vec`.
#![allow(unsafe_code)]

/// Huge-page size on x86-64 Linux: the buffer starts on this boundary.
const HUGE_PAGE: usize = 2 << 20;

/// Scratch floats the kernel packs into; contents are not kept when it grows.
pub(super) struct PackBuffer {
    memory: Memory,
    /// Floats usable from the start (`slice` returns this many).
    len: usize,
}

enum Memory {
    Empty,
    /// A mapping of `len` floats plus one huge page, used from `offset` bytes in.
    Mapped {
        map: memmap2::MmapMut,
        offset: usize,
    },
    Heap(Vec<f32>),
}

impl PackBuffer {
    /// An empty buffer (no memory until the first [`grown`](Self::grown)).
    pub(super) const fn new() -> Self {
        Self {
            memory: Memory::Empty,
            len: 0,
        }
    }

    /// Makes room for at least `floats` values (growing to `reserve` floats if it must
    /// grow at all) and returns the whole buffer.
    pub(super) fn grown(&mut self, floats: usize, reserve: usize) -> &mut [f32] {
        if self.len < floats {
            let len = reserve.max(floats);
            self.memory = map_huge(len).unwrap_or_else(|| Memory::Heap(vec![0.0; len]));
            self.len = len;
        }
        self.slice()
    }

    /// All `len` floats.
    fn slice(&mut self) -> &mut [f32] {
        match &mut self.memory {
            Memory::Empty => &mut [],
            // SAFETY: the mapping holds `len * 4 + HUGE_PAGE` bytes and `offset` is under
            // `HUGE_PAGE` and a multiple of the page size (so aligned for f32); anonymous
            // mappings are zero-filled, valid f32 values; `&mut self` makes it exclusive.
            Memory::Mapped { map, offset } => unsafe {
                std::slice::from_raw_parts_mut(map.as_mut_ptr().add(*offset).cast(), self.len)
            },
            Memory::Heap(v) => v,
        }
    }
}

/// An anonymous mapping for `floats` values starting on a huge-page boundary, advised to
/// use huge pages (`None` where the mapping fails).
fn map_huge(floats: usize) -> Option<Memory> {
    let bytes = floats.checked_mul(size_of::<f32>())?;
    let map = memmap2::MmapMut::map_anon(bytes.checked_add(HUGE_PAGE)?).ok()?;
    let offset = (HUGE_PAGE - map.as_ptr() as usize % HUGE_PAGE) % HUGE_PAGE;
    // The advice is a request: without THP the pages stay small and nothing else changes.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    Some(Memory::Mapped { map, offset })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_its_reserve_on_a_huge_page_boundary_and_keeps_contents_until_it_must_grow() {
        let mut buffer = PackBuffer::new();
        let floats = buffer.grown(10, 1000);
        assert_eq!(floats.len(), 1000);
        assert!(floats.iter().all(|&v| v == 0.0));
        #[cfg(target_os = "linux")]
        assert_eq!(floats.as_ptr() as usize % HUGE_PAGE, 0);
        floats[999] = 1.5;
        // Room enough: the same memory comes back.
        assert_eq!(buffer.grown(500, 0)[999], 1.5);
        // Grown past it: at least the floats asked for, fresh (zeroed) memory.
        let floats = buffer.grown(3000, 0);
        assert_eq!(floats.len(), 3000);
        assert_eq!(floats[999], 0.0);
    }
}
