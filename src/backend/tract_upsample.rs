//! A nearest-neighbour upsample of the last two axes (f32, integer scales) that copies on the
//! pool of [`super::par`], in place of tract's `NearestUpsample` once declutter has lowered
//! the ONNX `Resize` to it.
//!
//! Why: the denoisers' decoder upsamples twice (8x8 to 16x16, 16x16 to 32x32, 128 channels;
//! 4 MB of output at batch 8 on the 32x32 level). tract copies on one thread, and at two
//! threads its copy got slower, not faster (its input was written by the other core, as with
//! the concats of [`super::tract_concat`]): 0.35 ms of a batch-8 int8 denoiser_m call at one
//! thread, 0.45-1.4 ms at two (`int8_profile models/denoiser_m.int8.onnx 6 8 T`). Here runs of
//! whole planes are split over the pool; a copy is a copy, so any thread count gives the same
//! bits as tract.

use super::par::SyncPtr;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::NearestUpsample;

/// Output values per work item, at least (whole planes).
const CHUNK: usize = super::par::COPY_ITEM_VALUES;

/// `y[.., i, j] = x[.., i / sh, j / sw]` for f32 tensors of rank >= 2; axes before the last
/// two are kept.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PlaneUpsample {
    /// Scale of the second-to-last axis (rows).
    sh: usize,
    /// Scale of the last axis (columns).
    sw: usize,
}

impl Op for PlaneUpsample {
    fn name(&self) -> StaticName {
        "PlaneUpsample".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("rows x{}, columns x{}", self.sh, self.sw)])
    }

    op_as_typed_op!();
}

impl EvalOp for PlaneUpsample {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let x = input.to_plain_array_view::<f32>()?;
        let rank = x.ndim();
        ensure!(rank >= 2, "PlaneUpsample wants rank >= 2, got {:?}", x.shape());
        let (h, w) = (x.shape()[rank - 2], x.shape()[rank - 1]);
        let mut shape = x.shape().to_vec();
        shape[rank - 2] *= self.sh;
        shape[rank - 1] *= self.sw;
        let xs = x.as_slice().context("PlaneUpsample: input is not contiguous")?;
        let (plane, out_plane) = (h * w, h * self.sh * w * self.sw);
        let planes = xs.len().checked_div(plane).unwrap_or(0);
        let per_item = (CHUNK / out_plane.max(1)).max(1);
        // SAFETY: the items below write every value before the tensor is read (an empty
        // plane makes an empty tensor).
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        if out_plane > 0 {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("PlaneUpsample: output layout")?;
            let (src, dst) = (SyncPtr::of(xs.as_ptr()), SyncPtr(out.as_mut_ptr()));
            super::par::for_each(planes.div_ceil(per_item), |item| {
                for p in item * per_item..((item + 1) * per_item).min(planes) {
                    // SAFETY: the input holds `planes` planes of `plane` values and the output
                    // as many of `out_plane`; item `item` reads its planes and is the only
                    // writer of the same planes of the output.
                    unsafe {
                        let from = std::slice::from_raw_parts(src.ptr().add(p * plane), plane);
                        let to =
                            std::slice::from_raw_parts_mut(dst.ptr().add(p * out_plane), out_plane);
                        self.plane(from, to, w);
                    }
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl PlaneUpsample {
    /// One plane: each input row widened into the first of its `sh` output rows, which is then
    /// copied into the others.
    fn plane(&self, from: &[f32], to: &mut [f32], w: usize) {
        let ow = w * self.sw;
        for (row, rows) in from.chunks_exact(w).zip(to.chunks_exact_mut(ow * self.sh)) {
            let (first, rest) = rows.split_at_mut(ow);
            for (&v, wide) in row.iter().zip(first.chunks_exact_mut(self.sw)) {
                wide.fill(v);
            }
            for copy in rest.chunks_exact_mut(ow) {
                copy.copy_from_slice(first);
            }
        }
    }
}

impl TypedOp for PlaneUpsample {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1 && inputs[0].datum_type == f32::datum_type());
        let mut shape = inputs[0].shape.to_tvec();
        let rank = shape.len();
        ensure!(rank >= 2);
        shape[rank - 2] = shape[rank - 2].clone() * self.sh;
        shape[rank - 1] = shape[rank - 1].clone() * self.sw;
        Ok(tvec!(f32::fact(&*shape)))
    }

    as_op!();
}

/// Replaces every f32 `NearestUpsample` that scales only the last two axes (rank >= 2) by
/// [`PlaneUpsample`]. Returns how many it replaced.
pub fn use_plane_upsamples(model: &mut TypedModel) -> TractResult<usize> {
    super::tract_opt::replace_matches(model, "plane_upsample", |model, id| {
        let node = model.node(id);
        let Some(up) = node.op_as::<NearestUpsample>() else { return Ok(None) };
        let facts = model.node_input_facts(id)?;
        let rank = up.scales.len();
        let eligible = facts.len() == 1
            && facts[0].datum_type == f32::datum_type()
            && facts[0].rank() == rank
            && rank >= 2
            && up.scales[..rank - 2].iter().all(|&s| s == 1)
            && up.scales[rank - 2..].iter().all(|&s| s >= 1);
        // Built only once `eligible` has checked the rank, so the indexing cannot fail.
        Ok(eligible.then(|| {
            let op = PlaneUpsample { sh: up.scales[rank - 2], sw: up.scales[rank - 1] };
            (node.inputs.iter().copied().collect(), op)
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values::values;

    #[test]
    fn upsamples_like_tract_on_every_thread_count() {
        // (shape, row and column scales): the decoder's 2x at batch 8 (items of whole planes,
        // several per item) and batch 1 (planes larger than an item), unequal scales, rank 2,
        // a scale of 1 and an odd width.
        let cases: [(Vec<usize>, usize, usize); 5] = [
            (vec![8, 128, 16, 16], 2, 2),
            (vec![1, 4, 96, 96], 2, 2),
            (vec![2, 3, 5, 7], 3, 2),
            (vec![6, 9], 2, 3),
            (vec![1, 2, 4, 3], 1, 4),
        ];
        for (shape, sh, sw) in cases {
            let len = shape.iter().product();
            let input = Tensor::from_shape(&shape, &values(len, 7)).expect("shape").into_tvalue();
            let mut scales: TVec<usize> = tvec![1; shape.len()];
            scales[shape.len() - 2] = sh;
            scales[shape.len() - 1] = sw;
            let want = NearestUpsample { scales }
                .eval(&EvalContext::out_of_plan(), tvec![input.clone()])
                .expect("tract upsamples")
                .remove(0)
                .into_tensor();
            let got = crate::backend::par::on_thread_counts(|| {
                let ctx = EvalContext::out_of_plan();
                PlaneUpsample { sh, sw }
                    .eval(&ctx, tvec![input.clone()])
                    .expect("upsamples")
                    .remove(0)
            });
            for (k, g) in got.iter().enumerate() {
                assert_eq!(**g, want, "shape {shape:?} x{sh} x{sw} run {k}");
            }
        }
        let ctx = EvalContext::out_of_plan();
        let flat = Tensor::from_shape(&[3], &[0f32; 3]).expect("rank 1").into_tvalue();
        let err = PlaneUpsample { sh: 2, sw: 2 }.eval(&ctx, tvec![flat]).expect_err("rank 1");
        assert!(err.to_string().contains("rank >= 2"), "{err}");
    }
}
