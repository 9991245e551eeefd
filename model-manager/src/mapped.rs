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

impl MappedFile {
    /// Drops from the process every page of this mapping that still holds the file's bytes,
    /// so that it no longer counts in the resident set; the page cache keeps them and the next
    /// read faults them back in (a minor fault, no disk read while they stay cached). A page a
    /// buffer wrote to (copied on write, so no longer the file's) is kept. Returns the bytes
    /// dropped; 0 where `/proc/self/pagemap` cannot be read (nothing is dropped then).
    pub fn release_resident(&self) -> usize {
        release_file_pages(self.start, self.len)
    }

    /// Bytes of this mapping resident in the process.
    pub fn resident_bytes(&self) -> usize {
        resident_pages(self.start, self.len)
    }
}

/// `pagemap` entry bits (`Documentation/admin-guide/mm/pagemap.rst`).
const PAGE_PRESENT: u64 = 1 << 63;
const PAGE_SWAPPED: u64 = 1 << 62;
const PAGE_FILE: u64 = 1 << 61;

/// Pages whose `pagemap` entries are read per call.
const PAGEMAP_BATCH: usize = 1 << 16;

/// Whether a page with `pagemap` entry `entry` may be dropped: it is absent, or present and
/// still the file's page (not an anonymous copy made by a write, not swapped out).
fn holds_file_bytes(entry: u64) -> bool {
    entry & PAGE_SWAPPED == 0 && (entry & PAGE_PRESENT == 0 || entry & PAGE_FILE != 0)
}

/// Calls `each(page index, entry)` with the `pagemap` entry of every whole page of
/// `[start, start + len)`, in order; returns the first page's address, or `None` where
/// `/proc/self/pagemap` cannot be read (`each` is not called then).
#[cfg(target_os = "linux")]
fn for_each_pagemap_entry(
    start: usize,
    len: usize,
    mut each: impl FnMut(usize, u64),
) -> Option<usize> {
    use std::os::unix::fs::FileExt;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok()?;
    let page = page_size();
    let (first, whole) = pages_within(start, len);
    let pages = whole / page;
    let mut entries = vec![0u64; PAGEMAP_BATCH.min(pages)];
    let mut done = 0;
    while done < pages {
        let n = entries.len().min(pages - done);
        // SAFETY: the u8 view covers exactly the `n` entries read into.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(entries.as_mut_ptr().cast::<u8>(), n * 8) };
        pagemap
            .read_exact_at(bytes, ((first / page + done) * 8) as u64)
            .ok()?;
        for (i, &entry) in entries[..n].iter().enumerate() {
            each(done + i, entry);
        }
        done += n;
    }
    Some(first)
}

#[cfg(not(target_os = "linux"))]
fn for_each_pagemap_entry(
    _start: usize,
    _len: usize,
    _each: impl FnMut(usize, u64),
) -> Option<usize> {
    None
}

/// [`MappedFile::release_resident`] of the whole pages of `[start, start + len)`: reads every
/// entry first, then advises the runs of droppable pages.
fn release_file_pages(start: usize, len: usize) -> usize {
    let page = page_size();
    let mut released = 0;
    // Runs of droppable pages: (first page index, count).
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let first = for_each_pagemap_entry(start, len, |index, entry| {
        if !holds_file_bytes(entry) {
            return;
        }
        if entry & PAGE_PRESENT != 0 {
            released += page;
        }
        match runs.last_mut() {
            Some((at, count)) if *at + *count == index => *count += 1,
            _ => runs.push((index, 1)),
        }
    });
    let Some(first) = first else {
        return 0;
    };
    for (at, count) in runs {
        // SAFETY: pages of our own private file mapping that hold the file's bytes: the advice
        // unmaps them from the process and their next read maps the file's page again.
        unsafe {
            libc::madvise(
                (first + at * page) as *mut libc::c_void,
                count * page,
                libc::MADV_DONTNEED,
            )
        };
    }
    released
}

/// Bytes of the whole pages of `[start, start + len)` resident in the process (0 where
/// `/proc/self/pagemap` cannot be read).
fn resident_pages(start: usize, len: usize) -> usize {
    let mut present = 0;
    for_each_pagemap_entry(start, len, |_, entry| {
        present += usize::from(entry & PAGE_PRESENT != 0)
    });
    present * page_size()
}

/// The mapped files a loaded component's weights lie in (a UNet, a text encoder, a
/// ControlNet): [`WeightPages::release`] drops their resident pages between the stages that
/// use them ([`crate::weights::WeightResidency::Stage`]). Empty on devices that copy their
/// weights off the CPU, and with `--weights-io read`. Clones share one state.
#[derive(Debug, Clone)]
pub struct WeightPages {
    files: Vec<std::sync::Arc<MappedFile>>,
    /// Whether pages may have been mapped in since the last release (loading maps them).
    maybe_resident: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Default for WeightPages {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl WeightPages {
    /// Pages of `files`, as loading leaves them (resident).
    pub fn new(files: Vec<std::sync::Arc<MappedFile>>) -> Self {
        Self {
            files,
            maybe_resident: std::sync::Arc::new(true.into()),
        }
    }

    /// These pages and `other`'s.
    pub fn and(mut self, other: WeightPages) -> Self {
        self.files.extend(other.files);
        self.in_use();
        self
    }

    /// Notes that a stage is about to read these weights (mapping their pages back in).
    pub fn in_use(&self) {
        self.maybe_resident.store(true, Ordering::Release);
    }

    /// Bytes of these files' pages resident in the process now.
    pub fn resident_bytes(&self) -> usize {
        self.files.iter().map(|f| f.resident_bytes()).sum()
    }

    /// Drops every page still holding its file's bytes from the process
    /// ([`MappedFile::release_resident`]) unless nothing was used since the last release;
    /// returns the bytes dropped. The weights stay valid: a later read maps them back in.
    pub fn release(&self) -> usize {
        if !self.maybe_resident.swap(false, Ordering::AcqRel) {
            return 0;
        }
        self.files.iter().map(|f| f.release_resident()).sum()
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
    fn released_pages_leave_the_process_and_read_back_the_file() {
        let values: Vec<f32> = (0..256 * 1024).map(|i| (i % 977) as f32 - 3.5).collect();
        let (_guard, file) = file_of(&values);
        let m = std::sync::Arc::new(MappedFile::map(&file).unwrap());
        let lent: Vec<f32> = m.lend(0, values.len()).unwrap();
        let (ptr, len) = (lent.as_ptr() as usize, values.len() * 4);
        assert_eq!(resident_pages(ptr, len), len, "lending maps the pages in");
        let pages = WeightPages::new(vec![m.clone()]);
        assert_eq!(pages.release(), len);
        assert_eq!(resident_pages(ptr, len), 0);
        assert_eq!(lent, values, "a released page reads the file again");
        assert_eq!(resident_pages(ptr, len), len);
    }

    #[test]
    fn a_page_written_to_is_not_released() {
        let values: Vec<f32> = (0..64 * 1024).map(|i| i as f32).collect();
        let (_guard, file) = file_of(&values);
        let m = std::sync::Arc::new(MappedFile::map(&file).unwrap());
        let mut lent: Vec<f32> = m.lend(0, values.len()).unwrap();
        let per_page = page_size() / 4;
        lent[3 * per_page + 5] = -1.0; // copies page 3 on write
        let released = WeightPages::new(vec![m.clone()]).release();
        assert_eq!(released, values.len() * 4 - page_size());
        assert_eq!(lent[3 * per_page + 5], -1.0, "the written value survives");
        assert_eq!(lent[3 * per_page + 6], values[3 * per_page + 6]);
        assert_eq!(lent[per_page], values[per_page]);
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
