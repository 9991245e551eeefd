//! Tensor buffers that lie in a mapped weights file: a tensor the CPU holds exactly as the
//! file stores it (a conv filter, a norm, an f16 weight held in f16) becomes a `Vec` over the
//! file's pages instead of a copy. Loading then writes nothing and faults in no fresh memory
//! (the cost of a load on a VM: ~1 GB/s), the weights are one copy system-wide (the page
//! cache's) instead of two, and clean file pages are what the kernel can drop under pressure
//! rather than kill the process.
//!
//! candle keeps CPU tensors in `Vec`s, whose memory its owner hands back to the global
//! allocator when the tensor drops. This module is that allocator: the system's, except that a
//! buffer lent out of a mapping goes back to its mapping (its pages are dropped from the
//! process; the mapping is unmapped when the last buffer and the file are gone). A buffer is
//! a private (copy-on-write) mapping: writing to it never touches the file.
//!
//! The file must not be truncated or rewritten in place while mapped (replacing it, as
//! `fetch` and the HF cache do, is fine): that would fault the process. `--weights-io read`
//! copies instead, for filesystems where mapped reads are slow or unsafe.

use crate::kernels::cpu::Plain;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, which also takes back buffers lent out of mapped files.
pub struct Allocator;

#[global_allocator]
static GLOBAL: Allocator = Allocator;

/// Mapped files open at once; past this a file is read instead (each needs one slot).
const SLOTS: usize = 256;

/// `madvise` advice that maps a range's pages without writing them (Linux ≥ 5.14; older
/// kernels refuse it and the pages fault in on first use instead). Not in `libc` yet.
#[cfg(target_os = "linux")]
const MADV_POPULATE_READ: libc::c_int = 22;

/// One mapped file: its address range and the holders (the file, each buffer lent out).
#[derive(Debug, Clone, Copy)]
struct Region {
    start: usize,
    len: usize,
    holders: usize,
}

/// Every mapped file. Locked only to map, lend and release, and by a deallocation that falls
/// inside `[LOWEST, HIGHEST)`.
static REGIONS: Mutex<[Option<Region>; SLOTS]> = Mutex::new([None; SLOTS]);
/// The lowest start of a mapped region (`usize::MAX` when none).
static LOWEST: AtomicUsize = AtomicUsize::new(usize::MAX);
/// The highest end of a mapped region (0 when none).
static HIGHEST: AtomicUsize = AtomicUsize::new(0);

fn regions() -> std::sync::MutexGuard<'static, [Option<Region>; SLOTS]> {
    REGIONS.lock().unwrap_or_else(|e| e.into_inner())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 {
        page as usize
    } else {
        4096
    }
}

/// The whole pages inside `[start, start + len)`, as (start, len).
fn pages_within(start: usize, len: usize) -> (usize, usize) {
    let page = page_size();
    let first = start.div_ceil(page) * page;
    let end = (start + len) / page * page;
    (first, end.saturating_sub(first))
}

/// Releases one holder of the region containing `ptr` (a buffer of `len` bytes, or the file
/// when `len` is 0): drops the buffer's whole pages from the process and unmaps the region
/// with its last holder. Whether `ptr` was in a mapped region.
fn release(ptr: usize, len: usize) -> bool {
    if ptr < LOWEST.load(Ordering::Acquire) || ptr >= HIGHEST.load(Ordering::Acquire) {
        return false;
    }
    let mut slots = regions();
    let Some(slot) = slots
        .iter_mut()
        .find(|s| s.is_some_and(|r| ptr >= r.start && ptr < r.start + r.len))
    else {
        return false;
    };
    let Some(region) = slot.as_mut() else {
        return false; // not reached: `find` matched a region (nothing may panic in here)
    };
    region.holders -= 1;
    if region.holders == 0 {
        let Region { start, len, .. } = *region;
        *slot = None;
        // SAFETY: the region was mapped by `MappedFile::map` and nothing refers to it now.
        unsafe { libc::munmap(start as *mut libc::c_void, len) };
        bounds_from(&slots);
    } else if len > 0 {
        let (first, whole) = pages_within(ptr, len);
        if whole > 0 {
            // SAFETY: these pages belong to this buffer alone, which is being freed; in a
            // private file mapping the advice only drops them from the process.
            unsafe { libc::madvise(first as *mut libc::c_void, whole, libc::MADV_DONTNEED) };
        }
    }
    true
}

/// Resets the fast-path bounds to cover exactly the regions in `slots`.
fn bounds_from(slots: &[Option<Region>; SLOTS]) {
    let lowest = slots.iter().flatten().map(|r| r.start).min();
    let highest = slots.iter().flatten().map(|r| r.start + r.len).max();
    LOWEST.store(lowest.unwrap_or(usize::MAX), Ordering::Release);
    HIGHEST.store(highest.unwrap_or(0), Ordering::Release);
}

/// Weights files mapped now (each until its last lent buffer is freed).
pub fn mapped_files() -> usize {
    regions().iter().flatten().count()
}

/// Whether `ptr` lies in a mapped file (a buffer lent out of one points there).
pub(crate) fn is_mapped(ptr: usize) -> bool {
    ptr >= LOWEST.load(Ordering::Acquire)
        && ptr < HIGHEST.load(Ordering::Acquire)
        && regions()
            .iter()
            .flatten()
            .any(|r| ptr >= r.start && ptr < r.start + r.len)
}

// SAFETY: everything not lent out of a mapping is the system allocator's; a lent buffer is
// never passed to it (its deallocation releases it from its region instead, and a reallocation
// copies it into a fresh system block first).
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !release(ptr as usize, layout.size()) {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if !is_mapped(ptr as usize) {
            return System.realloc(ptr, layout, new_size);
        }
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        let fresh = System.alloc(new_layout);
        if !fresh.is_null() {
            std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
            release(ptr as usize, layout.size());
        }
        fresh
    }
}

/// A weights file mapped into memory (private, read and write), whose tensors can be lent out
/// as buffers ([`MappedFile::lend`]). Dropping it leaves lent buffers valid.
#[derive(Debug)]
pub struct MappedFile {
    start: usize,
    len: usize,
}

impl MappedFile {
    /// Maps all of `file`; `None` when it is empty, the system refuses, or too many files are
    /// mapped (callers read the file instead).
    pub fn map(file: &std::fs::File) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        let mut slots = regions();
        let slot = slots.iter_mut().find(|s| s.is_none())?;
        // SAFETY: a fresh private mapping of an open file; nothing else refers to it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        let start = ptr as usize;
        *slot = Some(Region {
            start,
            len,
            holders: 1,
        });
        bounds_from(&slots);
        Some(Self { start, len })
    }

    /// The `count` values of `T` at byte `offset` as a buffer over the file's pages, mapped in
    /// now; `None` when they are not aligned for `T`, lie outside the file, or are empty.
    pub fn lend<T: Plain>(&self, offset: usize, count: usize) -> Option<Vec<T>> {
        let bytes = count.checked_mul(std::mem::size_of::<T>())?;
        let ptr = self.start.checked_add(offset)?;
        if count == 0
            || offset.checked_add(bytes)? > self.len
            || ptr % std::mem::align_of::<T>() != 0
        {
            return None;
        }
        {
            let mut slots = regions();
            // The file is a holder, so its region is there (nothing may panic under the lock).
            let region = slots.iter_mut().flatten().find(|r| r.start == self.start)?;
            region.holders += 1;
        }
        #[cfg(target_os = "linux")]
        {
            let page = page_size();
            let first = ptr / page * page;
            // SAFETY: advice on pages of our own mapping; a refusal changes nothing.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    ptr + bytes - first,
                    MADV_POPULATE_READ,
                )
            };
        }
        // SAFETY: `count` values of the `Plain` `T` (any bits valid), aligned and inside this
        // mapping, which the new holder keeps mapped; the allocator above takes the buffer
        // back into its region when it is freed, never into the system allocator.
        Some(unsafe { Vec::from_raw_parts(ptr as *mut T, count, count) })
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        release(self.start, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(values: &[f32]) -> (tempfile_path::Guard, std::fs::File) {
        let guard = tempfile_path::Guard::new();
        let mut f = std::fs::File::create(&guard.0).unwrap();
        for v in values {
            f.write_all(&v.to_le_bytes()).unwrap();
        }
        drop(f);
        let file = std::fs::File::open(&guard.0).unwrap();
        (guard, file)
    }

    /// A path under the temp dir, removed on drop.
    mod tempfile_path {
        pub struct Guard(pub std::path::PathBuf);
        impl Guard {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicUsize, Ordering};
                static N: AtomicUsize = AtomicUsize::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                Self(
                    std::env::temp_dir()
                        .join(format!("jhakaas-mapped-{}-{n}.bin", std::process::id())),
                )
            }
        }
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn holders(m: &MappedFile) -> Option<usize> {
        regions()
            .iter()
            .flatten()
            .find(|r| r.start == m.start)
            .map(|r| r.holders)
    }

    #[test]
    fn a_lent_buffer_reads_the_file_and_outlives_it() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let (_guard, file) = file_of(&values);
        let m = MappedFile::map(&file).unwrap();
        let lent: Vec<f32> = m.lend(400, 3000).unwrap();
        assert_eq!(lent, values[100..3100]);
        assert_eq!(holders(&m), Some(2));
        let start = m.start;
        drop(m);
        drop(file);
        // The buffer still reads the values; freeing it unmaps the region.
        assert_eq!(lent[2999], values[3099]);
        drop(lent);
        assert!(!regions().iter().flatten().any(|r| r.start == start));
    }

    #[test]
    fn writing_or_growing_a_lent_buffer_leaves_the_file_alone() {
        let values: Vec<f32> = (0..3000).map(|i| i as f32).collect();
        let (guard, file) = file_of(&values);
        let m = MappedFile::map(&file).unwrap();
        let mut lent: Vec<f32> = m.lend(0, 3000).unwrap();
        lent[10] = -1.0;
        lent.push(42.0); // reallocated out of the mapping
        assert_eq!(holders(&m), Some(1));
        assert_eq!((lent[10], lent[11], lent[3000]), (-1.0, 11.0, 42.0));
        let again: Vec<f32> = m.lend(0, 3000).unwrap();
        assert_eq!(again, values);
        let on_disk = std::fs::read(&guard.0).unwrap();
        assert_eq!(&on_disk[40..44], &10f32.to_le_bytes());
    }

    #[test]
    fn a_range_that_is_misaligned_outside_or_empty_is_not_lent() {
        let (_guard, file) = file_of(&[1.0; 64]);
        let m = MappedFile::map(&file).unwrap();
        assert!(m.lend::<f32>(2, 4).is_none());
        assert!(m.lend::<f32>(0, 65).is_none());
        assert!(m.lend::<f32>(usize::MAX - 1, 1).is_none());
        assert!(m.lend::<f32>(0, 0).is_none());
        assert_eq!(holders(&m), Some(1));
    }
}
