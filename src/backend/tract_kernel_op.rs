//! One tract op for every convolution kernel of this crate ([`super::direct_conv`] in f32,
//! [`super::quant_conv`] in int8): the kernels differ, the tract plumbing (shapes, output
//! allocation, the optional run-time bias) does not.

use super::conv_kernel::{Addend, AddendKind, ConvKernel, ConvShape};
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// The tract op wrapping a packed kernel. Inputs `[n, ci, h, w]` f32 and either, when the bias
/// is computed at run time, the bias `[co]` f32, or, with an addend, the tensor added to the
/// output (`[n, co, 1, 1]` or `[n, co, ho, wo]`); output `[n, co, ho, wo]` f32 (the input plane
/// at stride 1, halved and rounded up at stride 2).
#[derive(Debug)]
pub struct KernelOp<K: ConvKernel> {
    kernel: Arc<K>,
    addend: Option<AddendKind>,
}

impl<K: ConvKernel> KernelOp<K> {
    /// Wraps `kernel`.
    pub fn new(kernel: K) -> Self {
        KernelOp { kernel: Arc::new(kernel), addend: None }
    }

    /// What the op adds to its output (its second input), if anything.
    pub fn addend(&self) -> Option<AddendKind> {
        self.addend
    }

    /// The same kernel, adding its second input to the output as `kind`.
    pub fn adding(&self, kind: AddendKind) -> Self {
        KernelOp { kernel: Arc::clone(&self.kernel), addend: Some(kind) }
    }
}

impl<K: ConvKernel> Clone for KernelOp<K> {
    fn clone(&self) -> Self {
        KernelOp { kernel: Arc::clone(&self.kernel), addend: self.addend }
    }
}

/// tract compares ops to merge duplicates; f32 weights have no total equality, so two ops are
/// equal when they share the packed weights (and add the same kind of tensor).
impl<K: ConvKernel> PartialEq for KernelOp<K> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.kernel, &other.kernel) && self.addend == other.addend
    }
}

impl<K: ConvKernel> Eq for KernelOp<K> {}

impl<K: ConvKernel> Op for KernelOp<K> {
    fn name(&self) -> StaticName {
        K::NAME.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let ConvShape { ci, co, k, stride } = self.kernel.shape();
        let adding = match self.addend {
            None => "",
            Some(AddendKind::PerChannel) => ", adding a value per channel",
            Some(AddendKind::Full) => ", adding a tensor",
        };
        Ok(vec![format!("{k}x{k} stride {stride}, {ci} -> {co} channels{adding}")])
    }

    op_as_typed_op!();
}

impl<K: ConvKernel> EvalOp for KernelOp<K> {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let name = K::NAME;
        let shape = self.kernel.shape();
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let &[n, ci, h, w] = x.shape() else {
            bail!("{name} wants a rank-4 input, got {:?}", x.shape())
        };
        ensure!(ci == shape.ci, "{name}: {ci} input channels, {} expected", shape.ci);
        let x = x.as_slice().with_context(|| format!("{name}: input is not contiguous"))?;
        let second = inputs.get(1).map(|b| b.to_plain_array_view::<f32>()).transpose()?;
        let second = match &second {
            Some(b) => {
                Some(b.as_slice().with_context(|| format!("{name}: input 1 not contiguous"))?)
            }
            None => None,
        };
        let (ho, wo) = shape.out_plane(h, w);
        // SAFETY: `run` writes every value of `y` when it returns Ok (an empty input makes an
        // empty `y`); on an error `y` is dropped unread.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[n, shape.co, ho, wo])? };
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().with_context(|| format!("{name}: output layout"))?;
            match (self.addend, second) {
                (None, bias) => self.kernel.run(x, n, h, w, bias, out),
                (Some(kind), Some(a)) => {
                    let addend = match kind {
                        AddendKind::PerChannel => Addend::PerChannel(a),
                        AddendKind::Full => Addend::Full(a),
                    };
                    self.kernel.run_with_addend(x, n, h, w, addend, out)
                }
                (Some(_), None) => Err(format!("{name}: the addend input is missing")),
            }
            .map_err(|e| anyhow!(e))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl<K: ConvKernel> TypedOp for KernelOp<K> {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type() && inputs[0].rank() == 4);
        let kernel = self.kernel.shape();
        let mut shape = inputs[0].shape.to_tvec();
        shape[1] = kernel.co.to_dim();
        if kernel.stride != 1 {
            // The load-time pass only swaps in strided kernels on planes of known size.
            let (h, w) = (shape[2].to_usize()?, shape[3].to_usize()?);
            let (ho, wo) = kernel.out_plane(h, w);
            (shape[2], shape[3]) = (ho.to_dim(), wo.to_dim());
        }
        Ok(tvec!(f32::fact(&*shape)))
    }

    as_op!();
}
