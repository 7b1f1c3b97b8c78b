//! A channel concat (axis 1, f32) that copies on the pool of [`super::par`], in place of
//! tract's `TypedConcat` for every axis-1 f32 concat of a freshly typed model.
//!
//! Why: the denoisers' decoder concatenates each skip connection with the upsampled features
//! (`[n, c1, h, w] ++ [n, c2, h, w]`, 3 MB at batch 8 on the 32x32 level). tract copies them on
//! one thread, and at two threads its copies got slower, not faster (the inputs were written by
//! the other core): 1.12 ms of a batch-8 denoiser_s call at one thread, 1.56 ms at two, on the
//! Zen 4 VM (`int8_profile models/denoiser_s.onnx 20 8 T`). Here each (image, input) block is
//! cut into chunks that the pool copies; a copy is a copy, so any thread count gives the same
//! bits.

use super::par::SyncPtr;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;

/// Values per copied chunk.
const CHUNK: usize = super::par::COPY_ITEM_VALUES;

/// Concatenation of f32 tensors of rank >= 2 along axis 1; every other axis must agree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelConcat;

impl Op for ChannelConcat {
    fn name(&self) -> StaticName {
        "ChannelConcat".into()
    }

    op_as_typed_op!();
}

impl EvalOp for ChannelConcat {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let views = inputs
            .iter()
            .map(|t| t.to_plain_array_view::<f32>())
            .collect::<TractResult<Vec<_>>>()?;
        let Some(first) = views.first() else { bail!("ChannelConcat: no inputs") };
        ensure!(first.ndim() >= 2, "ChannelConcat wants rank >= 2, got {:?}", first.shape());
        let (n, inner) = (first.shape()[0], first.shape()[2..].iter().product::<usize>());
        let mut slices = Vec::with_capacity(views.len());
        for v in &views {
            ensure!(
                v.ndim() == first.ndim()
                    && v.shape()[0] == n
                    && v.shape()[2..] == first.shape()[2..],
                "ChannelConcat: shapes {:?} and {:?} differ off axis 1",
                first.shape(),
                v.shape()
            );
            let s = v.as_slice().context("ChannelConcat: input is not contiguous")?;
            slices.push((SyncPtr::of(s.as_ptr()), v.shape()[1] * inner));
        }
        let image: usize = slices.iter().map(|s| s.1).sum();
        let mut shape = first.shape().to_vec();
        shape[1] = views.iter().map(|v| v.shape()[1]).sum();
        // (input, offset in it, offset in the output, length) of every chunk.
        let mut chunks = Vec::new();
        for b in 0..n {
            let mut at = b * image;
            for (i, &(_, block)) in slices.iter().enumerate() {
                for start in (0..block).step_by(CHUNK) {
                    let len = CHUNK.min(block - start);
                    chunks.push((i, b * block + start, at + start, len));
                }
                at += block;
            }
        }
        // SAFETY: the chunks cover every output value, written before the tensor is read.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("ChannelConcat: output layout")?;
            let out = SyncPtr(out.as_mut_ptr());
            let slices = &slices;
            super::par::for_each(chunks.len(), |c| {
                let (i, from, to, len) = chunks[c];
                // SAFETY: input `i` holds `n` blocks of `slices[i].1` values and the output
                // `n` images of `image`; chunk `c` reads `from..from + len` of its input and
                // is the only writer of `to..to + len` of the output.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        slices[i].0.ptr().cast_const().add(from),
                        out.ptr().add(to),
                        len,
                    )
                }
            });
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for ChannelConcat {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(!inputs.is_empty() && inputs.iter().all(|f| f.datum_type == f32::datum_type()));
        let mut shape = inputs[0].shape.to_tvec();
        ensure!(shape.len() >= 2);
        shape[1] = inputs.iter().map(|f| f.shape[1].clone()).sum();
        Ok(tvec!(f32::fact(&*shape)))
    }

    as_op!();
}

/// Replaces every axis-1 concat of f32 tensors (rank >= 2, at least two inputs) by
/// [`ChannelConcat`]. Returns how many it replaced.
pub fn use_channel_concats(model: &mut TypedModel) -> TractResult<usize> {
    super::tract_opt::replace_matches(model, "channel_concat", |model, id| {
        let node = model.node(id);
        let Some(concat) = node.op_as::<TypedConcat>() else { return Ok(None) };
        let facts = model.node_input_facts(id)?;
        let eligible = concat.axis == 1
            && facts.len() >= 2
            && facts.iter().all(|f| {
                f.datum_type == f32::datum_type() && f.rank() >= 2 && f.rank() == facts[0].rank()
            });
        Ok(eligible.then(|| (node.inputs.iter().copied().collect(), ChannelConcat)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_values::values;

    #[test]
    fn concatenates_like_tract_on_every_thread_count() {
        // Shapes (n, [channels], inner dims): the decoder's skip concat, a batch-1 block longer
        // than a chunk (split over the pool), rank 2 (the time embedding's sin ++ cos), and
        // three inputs.
        let cases: [(usize, Vec<usize>, Vec<usize>); 4] = [
            (8, vec![64, 32], vec![32, 32]),
            (1, vec![40, 24], vec![32, 32]),
            (3, vec![16, 16], vec![]),
            (2, vec![3, 1, 5], vec![7, 3]),
        ];
        for (n, channels, rest) in cases {
            let inputs: TVec<TValue> = channels
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let shape: Vec<usize> = [n, c].iter().chain(&rest).copied().collect();
                    let len = shape.iter().product();
                    Tensor::from_shape(&shape, &values(len, i as u64 + 1))
                        .expect("shape")
                        .into_tvalue()
                })
                .collect();
            let want = TypedConcat::new(1)
                .eval(&EvalContext::out_of_plan(), inputs.clone())
                .expect("tract concatenates")
                .remove(0)
                .into_tensor();
            let got = crate::backend::par::on_thread_counts(|| {
                let ctx = EvalContext::out_of_plan();
                ChannelConcat.eval(&ctx, inputs.clone()).expect("concatenates").remove(0)
            });
            for (k, g) in got.iter().enumerate() {
                assert_eq!(**g, want, "n={n} channels {channels:?} rest {rest:?} run {k}");
            }
        }
        let ctx = EvalContext::out_of_plan();
        let a = Tensor::from_shape(&[2, 3, 4], &[0f32; 24]).expect("a").into_tvalue();
        let b = Tensor::from_shape(&[2, 3, 5], &[0f32; 30]).expect("b").into_tvalue();
        let err = ChannelConcat.eval(&ctx, tvec![a, b]).expect_err("mismatched planes");
        assert!(err.to_string().contains("differ off axis 1"), "{err}");
    }
}
