//! The process's allocator settings for running the models.
//!
//! tract allocates every op's output afresh (at batch 8, 2 to 8 MB per activation) and frees it
//! when its last reader has run. glibc's malloc hands such blocks back to the kernel (large
//! blocks by `munmap`, the heap's free top by trimming it), so the next call takes page faults
//! on all of them again; those faults are taken by the kernels' threads when they first write
//! an output, and they contend in the kernel, so they also cost the second thread most of its
//! gain. Measured with these settings (`int8_profile models/denoiser_s.onnx 20 8 T`, one
//! batch-8 denoiser_s call, five interleaved runs each, Zen 4): 40.9 -> 37.4 ms at 2 threads,
//! 69 -> 65 ms at 1.

/// Largest block glibc may still take from the heap rather than by its own `mmap` (the most
/// `mallopt` accepts on 64-bit: half of glibc's 64 MiB heap size), bytes.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free heap top glibc keeps before trimming it, bytes: above any denoiser's working set.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 1 << 30;

/// Makes glibc's malloc keep freed memory for reuse instead of returning it to the kernel
/// after every model call (blocks up to 32 MiB from the heap, the heap trimmed only above
/// 1 GiB free), so the models' outputs do not take page faults anew at each call. This changes
/// the whole process's allocator, so the library never calls it by itself: the `diffshield`
/// binary does at start, and an embedder calls it once before building a
/// [`crate::Defense`] if the process may keep the memory (the resident size then stays at its
/// peak instead of falling between frames). Returns false where it does nothing: with another
/// C library than glibc, or when glibc refuses a setting (32-bit glibc refuses the 32 MiB
/// threshold: its heaps are 1 MiB).
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tuning parameters; it takes malloc's own lock
        // and may be called at any time from any thread.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_settings_and_allocations_still_work() {
        let kept = super::keep_freed_memory();
        // 64-bit glibc takes both settings; 32-bit glibc's heaps (1 MiB) are too small for
        // the threshold, and other C libraries have no mallopt.
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        if glibc && cfg!(target_pointer_width = "64") {
            assert!(kept, "64-bit glibc refused the settings");
        } else if !glibc {
            assert!(!kept);
        }
        // A block above the threshold (mmap), then many below it (heap), freed and reused.
        let big = vec![1u8; 64 << 20];
        assert_eq!(big.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
        drop(big);
        for i in 0..8 {
            let v = vec![i as f32; 2 << 20];
            assert_eq!(v[(2 << 20) - 1], i as f32);
        }
    }
}
