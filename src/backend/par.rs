//! Splitting one op's work over the pipeline's CPU threads.
//!
//! The pool is the pipeline's own ([`super::tract::CpuThreads`]), made once and installed for
//! the length of a model run by [`scope`]; the kernels ask for it with [`for_each`]. A kernel
//! splits its output into items that each compute a disjoint set of output values, every value
//! in the same order as on one thread, so a result is bit-identical for any thread count.

use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    /// The pool of the model run in progress on this thread; None runs everything inline.
    static POOL: RefCell<Option<Arc<rayon::ThreadPool>>> = const { RefCell::new(None) };
}

/// Runs `f` with `pool` as the kernels' pool on this thread (None: inline), restoring the
/// previous one afterwards (also when `f` unwinds, so a caught panic leaves no stale pool).
pub(crate) fn scope<R>(pool: Option<Arc<rayon::ThreadPool>>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Arc<rayon::ThreadPool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            POOL.with(|p| *p.borrow_mut() = previous);
        }
    }
    let _restore = Restore(POOL.with(|p| std::mem::replace(&mut *p.borrow_mut(), pool)));
    f()
}

/// Threads the current scope's pool has (1 outside a scope or on a worker).
pub(crate) fn threads() -> usize {
    POOL.with(|p| p.borrow().as_ref().map_or(1, |pool| pool.current_num_threads()))
}

/// Calls `f(i)` for every `i` in `0..items`, on the scope's pool when it has more than one
/// thread and there is more than one item, else inline in order. Each call must touch outputs
/// no other call touches.
pub(crate) fn for_each(items: usize, f: impl Fn(usize) + Sync + Send) {
    let pool = POOL.with(|p| p.borrow().clone());
    match pool {
        Some(pool) if items > 1 && pool.current_num_threads() > 1 => {
            use rayon::prelude::*;
            pool.install(|| (0..items).into_par_iter().for_each(f))
        }
        _ => (0..items).for_each(f),
    }
}

/// Values (f32) per item of the ops that only copy (channel concats, upsamples): 64 KB, small
/// enough that a batch-1 tensor still splits over the pool, large enough that an item's cost
/// stays below its copy. One figure for both, so they are tuned together.
pub(crate) const COPY_ITEM_VALUES: usize = 16 * 1024;

/// A raw pointer that may cross to the pool's threads.
///
/// Soundness rests on the users: every use in this crate hands it to [`for_each`] items that
/// read shared inputs and write disjoint output ranges, and the buffer outlives the call
/// (`for_each` returns only when every item is done).
#[derive(Debug)]
pub(crate) struct SyncPtr<T>(pub *mut T);

impl<T> SyncPtr<T> {
    /// The pointer (a method, so that closures capture the whole `SyncPtr`, not its field).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

impl<T> Clone for SyncPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SyncPtr<T> {}

// SAFETY: see the type's comment: concurrent items never write the same element, and nothing
// reads an element another item writes.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// A pointer for reading only.
    pub(crate) fn of(p: *const T) -> Self {
        SyncPtr(p.cast_mut())
    }
}

/// Runs `f` inline and with pools of 2 and 3 threads; the kernels' tests compare the results.
#[cfg(test)]
pub(crate) fn on_thread_counts<R>(f: impl Fn() -> R) -> [R; 3] {
    let pool =
        |n| Some(Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool")));
    [f(), scope(pool(2), &f), scope(pool(3), &f)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> Option<Arc<rayon::ThreadPool>> {
        Some(Arc::new(rayon::ThreadPoolBuilder::new().num_threads(n).build().expect("pool")))
    }

    #[test]
    fn items_run_once_each_on_the_pool_and_inline_outside_it() {
        let mut out = vec![0usize; 1000];
        let p = SyncPtr(out.as_mut_ptr());
        let main = std::thread::current().id();
        let on_workers = std::sync::atomic::AtomicUsize::new(0);
        scope(pool(3), || {
            assert_eq!(threads(), 3);
            for_each(1000, |i| {
                if std::thread::current().id() != main {
                    on_workers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                // SAFETY: item i writes element i only; `out` outlives the call.
                unsafe { *p.ptr().add(i) += i + 1 };
            });
        });
        assert!(out.iter().enumerate().all(|(i, &v)| v == i + 1), "each item exactly once");
        assert_eq!(on_workers.into_inner(), 1000, "a pool's items run on its threads");
        assert_eq!(threads(), 1, "the scope ends with its closure");
        let order = std::sync::Mutex::new(Vec::new());
        for_each(5, |i| order.lock().expect("lock").push(i));
        assert_eq!(order.into_inner().expect("lock"), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_panicking_scope_restores_the_previous_pool() {
        let result = std::panic::catch_unwind(|| scope(pool(2), || panic!("inside")));
        assert!(result.is_err());
        assert_eq!(threads(), 1);
    }
}
