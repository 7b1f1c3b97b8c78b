//! Puts [`QuantConv`] into tract plans of the int8 (QOperator) models: every
//! `QuantizeLinear -> [Pad] -> QLinearConv -> DequantizeLinear` chain with a 3x3 (padding 1,
//! as an explicit u8 `Pad` of the zero point) or 1x1 kernel, stride 1, one group, constant
//! s8 weights with zero point 0, becomes one op from the f32 input to the f32 output.
//!
//! The pass runs before tract's first declutter on a freshly typed model and leaves anything
//! that differs (the stride-2 convs, a conv whose u8 output has other readers) to tract. It
//! does nothing on CPUs without AVX-512 VNNI. A second pass then folds the `Add` that follows
//! many of these convs (the residual sum, the time embedding per channel) into the conv,
//! which adds while it writes its output: the same bits, one pass over the activation fewer.

use super::conv_kernel::AddendKind;
use super::quant_conv::{InputQuant, QuantConv};
use super::simd::KernelLevel;
use super::tract_kernel_op::KernelOp;
use super::tract_match::{binary, constant, floats, integers, producer, unary};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::ops::quant::{DequantizeLinearF32, QuantizeLinearU8};

/// Replaces every eligible quantized conv chain of a typed model by a [`KernelOp`] of
/// [`QuantConv`]. Returns
/// how many it replaced (0 below kernel level avx512 and on CPUs without AVX-512 VNNI).
pub fn use_quant_convs(model: &mut TypedModel, level: KernelLevel) -> TractResult<usize> {
    if !QuantConv::available(level) {
        return Ok(0);
    }
    super::tract_opt::replace_matches(model, "int8_conv", |model, id| {
        Ok(chain_at(model, id).map(|(input, conv)| (tvec![input], KernelOp::new(conv))))
    })
}

/// Folds every f32 `Add` of an int8 conv's output (which nothing else reads) and a tensor of
/// the same batch and channels, either `[n, co, 1, 1]` or the output's shape, into the conv.
/// Returns how many it folded. Run after [`use_quant_convs`].
pub fn fuse_adds_into_quant_convs(model: &mut TypedModel) -> TractResult<usize> {
    super::tract_opt::replace_matches(model, "adding", |model, id| {
        let Some((a, b)) = binary(model, OutletId::new(id, 0), "Add") else { return Ok(None) };
        for (conv_out, other) in [(a, b), (b, a)] {
            if let Some(found) = addend_of(model, conv_out, other) {
                return Ok(Some(found));
            }
        }
        Ok(None)
    })
}

/// For `conv_out + other`: the conv's input and the conv adding `other`, when `conv_out` is an
/// int8 conv's only reader-free output and `other` fits.
fn addend_of(
    model: &TypedModel,
    conv_out: OutletId,
    other: OutletId,
) -> Option<(TVec<OutletId>, KernelOp<QuantConv>)> {
    let (conv_node, op) = producer::<KernelOp<QuantConv>>(model, conv_out)?;
    if op.addend().is_some()
        || model.outlet_successors(conv_out).len() != 1
        || model.output_outlets().ok()?.contains(&conv_out)
    {
        return None;
    }
    let out = model.outlet_fact(conv_out).ok()?;
    let add = model.outlet_fact(other).ok()?;
    if add.datum_type != f32::datum_type() || add.rank() != 4 || out.rank() != 4 {
        return None;
    }
    // Batch and channels must match exactly (no broadcasting over them).
    if add.shape[0] != out.shape[0] || add.shape[1] != out.shape[1] {
        return None;
    }
    let one = TDim::from(1);
    let kind = if add.shape[2] == one && add.shape[3] == one {
        AddendKind::PerChannel
    } else if add.shape[2] == out.shape[2] && add.shape[3] == out.shape[3] {
        AddendKind::Full
    } else {
        return None;
    };
    Some((tvec![conv_node.inputs[0], other], op.adding(kind)))
}

/// Matches the chain ending at node `id` (the `DequantizeLinearF32`): its f32 input and the
/// packed conv.
fn chain_at(model: &TypedModel, id: usize) -> Option<(OutletId, QuantConv)> {
    let dequant = model.node(id);
    dequant.op_as::<DequantizeLinearF32>()?;
    let (conv_node, conv) = producer::<Conv>(model, *dequant.inputs.first()?)?;
    // The u8 output must feed this DequantizeLinear only: the op replaces both.
    if model.outlet_successors(OutletId::new(conv_node.id, 0)).len() != 1 {
        return None;
    }
    let spec = &conv.pool_spec;
    let k = *spec.kernel_shape.first()?;
    let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|d| d.iter().all(|&x| x == 1));
    let valid = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(a, b) => a.iter().chain(b.iter()).all(|&p| p == 0),
        _ => false,
    };
    if conv.q_params != Some(u8::datum_type())
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || !(k == 1 || k == 3)
        || spec.kernel_shape.as_slice() != [k, k]
        || !ones(&spec.strides)
        || !ones(&spec.dilations)
        || !valid
        || conv_node.inputs.len() != 9
    {
        return None;
    }
    let inputs = &conv_node.inputs;
    // x0, xs, w0, ws (y0, ys describe the output quantization this op skips).
    let x_zero = integers(model, inputs[3])?;
    let x_scale = floats(model, inputs[4])?;
    let w_zero = integers(model, inputs[5])?;
    let w_scales = floats(model, inputs[6])?;
    if x_zero.len() != 1 || x_scale.len() != 1 || w_zero.iter().any(|&z| z != 0) {
        return None;
    }
    // The quantized input: Pad(zero point) for 3x3, then QuantizeLinearU8 of an f32 outlet.
    let mut quantized = inputs[0];
    if k == 3 {
        let (unpadded, pad) = unary::<Pad>(model, quantized)?;
        let PadMode::Constant(value) = &pad.mode else { return None };
        let value = value.cast_to_scalar::<i64>().ok()?;
        if pad.pads.as_slice() != [(0, 0), (0, 0), (1, 1), (1, 1)] || value != x_zero[0] {
            return None;
        }
        quantized = unpadded;
    }
    let (source, mini) = unary::<ElementWiseOp>(model, quantized)?;
    let q = mini.0.downcast_ref::<QuantizeLinearU8>()?;
    if q.zero_point as i64 != x_zero[0] {
        return None;
    }
    let fact = model.outlet_fact(source).ok()?;
    if fact.datum_type != f32::datum_type() || fact.rank() != 4 {
        return None;
    }
    let weights = constant(model, inputs[1])?;
    let &[co, ci, kh, kw] = weights.shape() else { return None };
    if (kh, kw) != (k, k) || weights.datum_type() != i8::datum_type() {
        return None;
    }
    let weights: Vec<i8> = weights.to_plain_array_view::<i8>().ok()?.iter().copied().collect();
    // A bias that is not a constant (never the case in these exports) keeps tract's conv.
    let bias = integers(model, inputs[2])?;
    let bias: Vec<i32> = bias.iter().map(|&v| i32::try_from(v).ok()).collect::<Option<_>>()?;
    let input = InputQuant { inv_scale: q.scale, zero: q.zero_point };
    let conv = QuantConv::new(&weights, &w_scales, Some(&bias), x_scale[0], input, co, ci, k)?;
    let dim = |i: usize| fact.shape[i].as_i64().and_then(|d| usize::try_from(d).ok());
    let plane = dim(2).zip(dim(3));
    Some((source, conv.with_winograd_for(plane, &weights)))
}
