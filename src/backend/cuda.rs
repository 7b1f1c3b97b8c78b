//! The CUDA engine: tract-cuda's registered runtime (cudarc underneath: driver, NVRTC, cuBLAS,
//! cuDNN loaded at run time), behind feature `cuda`. Only the probe lives here; the models run
//! through [`super::tract`]'s engine-agnostic plans, so the purifier, the plan, votes, budget
//! and noise streams are the CPU path's (the noise is drawn on the host and uploaded with x_t
//! at every step, so a seed gives the same noise on either engine).

use crate::error::{Error, Result};
use tract_onnx::prelude::Runtime;

/// tract-cuda's runtime where it is usable on this machine; otherwise an error naming why
/// (tract-cuda's own probe, which returns an error rather than panicking where libcuda is
/// missing).
#[cfg(any(feature = "cuda", feature = "cuda-jetpack6"))]
pub(crate) fn runtime() -> Result<&'static dyn Runtime> {
    // Naming the crate keeps its runtime registration in the binary (the linker would drop it).
    let _ = tract_cuda::CudaTransform;
    let rt = tract_onnx::tract_core::runtime::runtime_for_name("cuda")
        .map_err(|e| Error::BackendUnavailable(format!("no CUDA backend: {e:#}")))?
        .ok_or_else(|| {
            Error::BackendUnavailable("no CUDA backend: tract-cuda registered no runtime".into())
        })?;
    rt.check()
        .map_err(|e| Error::BackendUnavailable(format!("no CUDA backend usable here: {e:#}")))?;
    Ok(rt)
}

/// Without feature `cuda` there is none.
#[cfg(not(any(feature = "cuda", feature = "cuda-jetpack6")))]
pub(crate) fn runtime() -> Result<&'static dyn Runtime> {
    Err(Error::BackendUnavailable(
        "this build has no CUDA backend (build with --features cuda); use --backend cpu or auto"
            .into(),
    ))
}
