//! Puts the attention kernel of [`super::attention`] into tract plans in place of the
//! denoisers' exported attention blocks.
//!
//! The pass matches the typed pattern of a freshly typed model (before declutter rewrites it):
//! queries, keys and values sliced out of one `[n, 3, c, l]` tensor (the qkv conv's output,
//! reshaped), `EinSum amk,akn->amn` of the moved queries and the keys, `Mul` by a scalar
//! constant, `Softmax` over the last axis, the probabilities moved, and `EinSum amk,akn->amn` of
//! the values and the moved probabilities. [`AttentionOp`] reads the `[n, 3, c, l]` tensor
//! directly, so the three slice copies go too. Anything that differs keeps tract's ops, and so
//! does everything at kernel level `tract`. In the int8 models, where the CPU has AVX-512
//! BF16, the op runs the bf16-product kernel of [`super::attention_bf16`] instead.

use super::attention::{attend_images, AttentionShape};
use super::simd::KernelLevel;
use super::tract_match::{binary, unary, with_constant};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

/// Attention over `[n, parts, c, l]` f32 (queries, keys and values at indices `q`, `k`, `v` of
/// axis 1); output `[n, c, l]` f32.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionOp {
    q: usize,
    k: usize,
    v: usize,
    scale: f32,
    level: KernelLevel,
    /// bf16 products ([`super::attention_bf16`]) instead of the level's f32 kernel.
    bf16: bool,
}

impl Eq for AttentionOp {}

impl Op for AttentionOp {
    fn name(&self) -> StaticName {
        "Attention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "q/k/v parts {}/{}/{}, scale {}, {}",
            self.q,
            self.k,
            self.v,
            self.scale,
            if self.bf16 {
                "bf16 products".to_string()
            } else {
                format!("{} kernels", self.level.name())
            }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for AttentionOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let &[n, parts, c, l] = x.shape() else {
            bail!("Attention wants a rank-4 input, got {:?}", x.shape())
        };
        ensure!(self.q.max(self.k).max(self.v) < parts, "Attention: {parts} parts");
        let x = x.as_slice().context("Attention: input is not contiguous")?;
        let shape = AttentionShape { channels: c, pixels: l };
        // SAFETY: f32 has no invalid bit patterns, and `attend` writes every value of `y`.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&[n, c, l])? };
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("Attention: output is not contiguous")?;
            let part =
                |b: usize, p: usize| &x[(b * parts + p) * c * l..(b * parts + p + 1) * c * l];
            let qkv = |b: usize| [part(b, self.q), part(b, self.k), part(b, self.v)];
            if self.bf16 {
                super::attention_bf16::attend_images(shape, self.scale, n, qkv, out)
            } else {
                attend_images(self.level, shape, self.scale, n, qkv, out)
            }
            .map_err(|e| anyhow!(e))?;
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for AttentionOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type() && inputs[0].rank() == 4);
        let s = &inputs[0].shape;
        Ok(tvec!(f32::fact([s[0].clone(), s[2].clone(), s[3].clone()])))
    }

    as_op!();
}

/// Replaces every exported attention block of a freshly typed model by [`AttentionOp`], with
/// bf16 products when `bf16` (the caller's choice: int8 models only) and this CPU has AVX-512
/// BF16 at level avx512. Returns how many it replaced (0 at level `tract`) and whether they
/// use bf16.
pub fn fuse_attention(
    model: &mut TypedModel,
    level: KernelLevel,
    bf16: bool,
) -> TractResult<(usize, bool)> {
    if level == KernelLevel::Tract {
        return Ok((0, false));
    }
    let bf16 = bf16 && level == KernelLevel::Avx512 && super::attention_bf16::supported();
    let count = super::tract_opt::replace_matches(model, "attention", |model, id| {
        Ok(attention_at(model, id, level, bf16).map(|(input, op)| (tvec![input], op)))
    })?;
    Ok((count, bf16 && count > 0))
}

/// The two inputs of `EinSum amk,akn->amn` (a batched matrix product) at `outlet`.
fn batched_matmul(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, OutletId)> {
    let node = model.node(outlet.node);
    let einsum = node.op_as::<EinSum>()?;
    let plain = einsum.q_params.is_none()
        && einsum.operating_dt == f32::datum_type()
        && einsum.axes.to_string() == "amk,akn->amn"
        && node.inputs.len() == 2;
    plain.then(|| (node.inputs[0], node.inputs[1]))
}

/// `outlet` moved from axis 1 to 2 (a transposition of the last two of three axes).
fn transposed(model: &TypedModel, outlet: OutletId) -> Option<OutletId> {
    match unary::<AxisOp>(model, outlet)? {
        (input, AxisOp::Move(1, 2)) => Some(input),
        _ => None,
    }
}

/// `Rm(1)` of `Slice(axis 1, p..p+1)` of a `[n, parts, c, l]` f32 tensor: (the tensor, p).
fn part_of(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, usize)> {
    let (sliced, AxisOp::Rm(1)) = unary::<AxisOp>(model, outlet)? else { return None };
    let (source, slice) = unary::<Slice>(model, sliced)?;
    let start = slice.start.to_usize().ok()?;
    let one = slice.axis == 1 && slice.end.to_usize().ok()? == start + 1;
    let fact = model.outlet_fact(source).ok()?;
    (one && fact.rank() == 4 && fact.datum_type == f32::datum_type()).then_some((source, start))
}

/// Matches the attention block ending at node `id` (the values-times-probabilities EinSum).
fn attention_at(
    model: &TypedModel,
    id: usize,
    level: KernelLevel,
    bf16: bool,
) -> Option<(OutletId, AttentionOp)> {
    let (values, moved_probs) = batched_matmul(model, OutletId::new(id, 0))?;
    let (scaled, softmax) = unary::<Softmax>(model, transposed(model, moved_probs)?)?;
    if softmax.axes.as_slice() != [2] || softmax.kind != SoftmaxKind::Softmax {
        return None;
    }
    if softmax.quant_output_dt.is_some() {
        return None;
    }
    let (scores, scale) = with_constant(model, binary(model, scaled, "Mul")?)?;
    let &[scale] = scale.as_slice() else { return None };
    let (moved_q, keys) = batched_matmul(model, scores)?;
    let (source, q) = part_of(model, transposed(model, moved_q)?)?;
    let (k_source, k) = part_of(model, keys)?;
    let (v_source, v) = part_of(model, values)?;
    let dims = model.outlet_fact(source).ok()?.shape.to_tvec();
    let fits = |d: &TDim| d.to_usize().ok().map(|x| x > 0 && x.is_multiple_of(16));
    let whole = fits(&dims[2])? && fits(&dims[3])?;
    (k_source == source && v_source == source && whole && scale.is_finite())
        .then_some((source, AttentionOp { q, k, v, scale, level, bf16 }))
}
