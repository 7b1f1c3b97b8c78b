//! Puts [`DirectConv`] into tract plans: a tract op that runs it, and the load-time pass that
//! swaps it in for every eligible convolution.
//!
//! Eligible: a float NCHW conv, OIHW kernel 3x3 with padding 1 (stride 1 or 2) or 1x1 without
//! padding (stride 1), dilation 1, one group, constant kernel, known channels and plane size
//! (the batch may be symbolic). Everything else (int8 models among them) keeps tract's own
//! lowering. The pass runs before tract's declutter, which would otherwise turn the 1x1 convs
//! into einsums. It does nothing at the level without a direct conv (tract).

use super::direct_conv::DirectConv;
use super::simd::KernelLevel;
use super::tract_kernel_op::KernelOp;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// Replaces every eligible conv of a typed model by a [`KernelOp`] of [`DirectConv`]. Returns
/// how many it replaced (0 at levels without a direct conv).
pub fn use_direct_convs(model: &mut TypedModel, level: KernelLevel) -> TractResult<usize> {
    if !DirectConv::available(level) {
        return Ok(0);
    }
    super::tract_opt::replace_matches(model, "direct_conv", |model, id| {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { return Ok(None) };
        let Some((packed, runtime_bias)) = eligible(model, node, conv, level)? else {
            return Ok(None);
        };
        let mut inputs = tvec![node.inputs[0]];
        if runtime_bias {
            inputs.push(node.inputs[2]);
        }
        Ok(Some((inputs, KernelOp::new(packed))))
    })
}

/// The packed kernel when `conv` (at `node`) is one the direct kernel computes exactly, and
/// whether its bias is a run-time input (a `[co]` vector) rather than a constant.
fn eligible(
    model: &TypedModel,
    node: &TypedNode,
    conv: &Conv,
    level: KernelLevel,
) -> TractResult<Option<(DirectConv, bool)>> {
    let spec = &conv.pool_spec;
    let k = spec.kernel_shape.first().copied().unwrap_or(0);
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || !(spec.kernel_shape.as_slice() == [3, 3] || spec.kernel_shape.as_slice() == [1, 1])
        || !(spec.strides().iter().all(|&s| s == 1)
            || (k == 3 && spec.strides().as_ref() == [2, 2]))
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
    let stride = spec.strides()[0];
    let packed = |bias: &[f32]| DirectConv::strided(weights, bias, co, ci, k, stride, level);
    match &bias.konst {
        Some(konst) => {
            let values = konst.to_plain_array_view::<f32>()?;
            let Some(values) = values.as_slice() else { return Ok(None) };
            Ok(packed(values).map(|c| (c, false)))
        }
        None if bias.shape.as_concrete() == Some(&[co]) => {
            Ok(packed(&vec![0.0; co]).map(|c| (c, true)))
        }
        None => Ok(None),
    }
}
