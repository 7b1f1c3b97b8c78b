//! Puts [`DirectConv`] into tract plans: a tract op that runs it, and the load-time pass that
//! swaps it in for every eligible convolution.
//!
//! Eligible: a float NCHW conv, OIHW kernel 3x3 with padding 1 or 1x1 without padding, stride
//! 1, dilation 1, one group, constant kernel, known channels and plane size (the batch may be
//! symbolic). Everything else (stride-2 convs, int8 models) keeps tract's own lowering. The
//! pass runs before tract's declutter, which would otherwise turn the 1x1 convs into einsums.
//! It does nothing on CPUs without AVX-512.

use super::direct_conv::DirectConv;
use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// The tract op wrapping a packed convolution. Inputs `[n, ci, h, w]` f32 and, when the bias
/// is computed at run time, the bias `[co]` f32; output `[n, co, h, w]` f32.
#[derive(Debug, Clone)]
pub struct DirectConvOp {
    conv: Arc<DirectConv>,
}

/// tract compares ops to merge duplicates; f32 weights have no total equality, so two ops are
/// equal when they share the packed weights.
impl PartialEq for DirectConvOp {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.conv, &other.conv)
    }
}

impl Eq for DirectConvOp {}

impl Op for DirectConvOp {
    fn name(&self) -> StaticName {
        "DirectConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let c = &self.conv;
        let k = c.kernel_size();
        Ok(vec![format!("{k}x{k}, {} -> {} channels", c.input_channels(), c.output_channels())])
    }

    op_as_typed_op!();
}

impl EvalOp for DirectConvOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let &[n, ci, h, w] = x.shape() else {
            bail!("DirectConv wants a rank-4 input, got {:?}", x.shape())
        };
        ensure!(ci == self.conv.input_channels(), "DirectConv: {ci} input channels");
        let x = x.as_slice().context("DirectConv: input is not contiguous")?;
        let bias = inputs.get(1).map(|b| b.to_plain_array_view::<f32>()).transpose()?;
        let bias = match &bias {
            Some(b) => Some(b.as_slice().context("DirectConv: bias is not contiguous")?),
            None => None,
        };
        // SAFETY: f32 has no invalid bit patterns, and `run` writes every value of `y`.
        let mut y =
            unsafe { Tensor::uninitialized::<f32>(&[n, self.conv.output_channels(), h, w])? };
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("DirectConv: output is not contiguous")?;
            self.conv.run(x, n, h, w, bias, out).map_err(|e| anyhow!(e))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for DirectConvOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type() && inputs[0].rank() == 4);
        let mut shape = inputs[0].shape.to_tvec();
        shape[1] = self.conv.output_channels().to_dim();
        Ok(tvec!(f32::fact(&*shape)))
    }

    as_op!();
}

/// Replaces every eligible conv of a typed model by [`DirectConvOp`]. Returns how many it
/// replaced (0 on CPUs without AVX-512).
pub fn use_direct_convs(model: &mut TypedModel) -> TractResult<usize> {
    if !DirectConv::supported() {
        return Ok(0);
    }
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { continue };
        let Some((packed, runtime_bias)) = eligible(model, node, conv)? else { continue };
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("direct-conv {name}"));
        let mut inputs = tvec![patch.tap_model(model, node.inputs[0])?];
        if runtime_bias {
            inputs.push(patch.tap_model(model, node.inputs[2])?);
        }
        let y = patch.wire_node(&name, DirectConvOp { conv: Arc::new(packed) }, &inputs)?[0];
        super::tract_opt::replace_node(model, patch, id, y)?;
        count += 1;
    }
    model.compact()?;
    Ok(count)
}

/// The packed kernel when `conv` (at `node`) is one the direct kernel computes exactly, and
/// whether its bias is a run-time input (a `[co]` vector) rather than a constant.
fn eligible(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
) -> TractResult<Option<(DirectConv, bool)>> {
    let spec = &conv.pool_spec;
    let k = spec.kernel_shape.first().copied().unwrap_or(0);
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || !(spec.kernel_shape.as_slice() == [3, 3] || spec.kernel_shape.as_slice() == [1, 1])
        || spec.strides().iter().any(|&s| s != 1)
        || spec.dilations().iter().any(|&d| d != 1)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(node.id)?;
    let (x, kernel, bias) = (facts[0], facts[1], facts[2]);
    if x.datum_type != f32::datum_type() || x.rank() != 4 {
        return Ok(None);
    }
    // Channels and plane must be known; the batch may still be a symbol.
    let dims: Option<Vec<usize>> = x.shape.iter().skip(1).map(|d| d.to_usize().ok()).collect();
    let Some(dims) = dims else { return Ok(None) };
    let pad = k / 2;
    let padding = spec.computed_padding(&dims[1..]);
    if padding.iter().any(|p| p.pad_before != pad || p.pad_after != pad) {
        return Ok(None);
    }
    let Some(kernel) = &kernel.konst else { return Ok(None) };
    if kernel.datum_type() != f32::datum_type() || bias.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let &[co, ci, kh, kw] = kernel.shape() else { return Ok(None) };
    if ci != dims[0] || kh != k || kw != k {
        return Ok(None);
    }
    let weights = kernel.to_plain_array_view::<f32>()?;
    let Some(weights) = weights.as_slice() else { return Ok(None) };
    match &bias.konst {
        Some(konst) => {
            let values = konst.to_plain_array_view::<f32>()?;
            let Some(values) = values.as_slice() else { return Ok(None) };
            Ok(DirectConv::new(weights, values, co, ci, k).map(|c| (c, false)))
        }
        None if bias.shape.as_concrete() == Some(&[co]) => {
            Ok(DirectConv::new(weights, &vec![0.0; co], co, ci, k).map(|c| (c, true)))
        }
        None => Ok(None),
    }
}
