//! Small matchers shared by the load-time passes that recognise exported patterns in a freshly
//! typed tract model ([`super::tract_groupnorm`], [`super::tract_attention`],
//! [`super::tract_quant`]). Each returns `None` when the graph differs, so a pass leaves
//! anything it does not recognise to tract.

use std::sync::Arc;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;

/// The node feeding `outlet`, if its op is of type `T`.
pub(super) fn producer<T: Op>(model: &TypedModel, outlet: OutletId) -> Option<(&TypedNode, &T)> {
    let node = model.node(outlet.node);
    node.op_as::<T>().map(|op| (node, op))
}

/// The single input of the node feeding `outlet` when its op is `T`, with the op.
pub(super) fn unary<T: Op>(model: &TypedModel, outlet: OutletId) -> Option<(OutletId, &T)> {
    let (node, op) = producer::<T>(model, outlet)?;
    (node.inputs.len() == 1).then(|| (node.inputs[0], op))
}

/// The inputs of a binary op called `name` (Add, Sub, Mul, Div) at `outlet`.
pub(super) fn binary(
    model: &TypedModel,
    outlet: OutletId,
    name: &str,
) -> Option<(OutletId, OutletId)> {
    let (node, _) = producer::<TypedBinOp>(model, outlet)?;
    (node.op.name() == name && node.inputs.len() == 2).then(|| (node.inputs[0], node.inputs[1]))
}

/// The value of a constant outlet, looking through a `Cast` of a constant (how tract types
/// QLinearConv's int32 bias and zero points).
pub(super) fn constant(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    if let Some(k) = model.outlet_fact(outlet).ok()?.konst.clone() {
        return Some(k);
    }
    let (node, cast) = producer::<Cast>(model, outlet)?;
    let inner = model.outlet_fact(*node.inputs.first()?).ok()?.konst.clone()?;
    inner.cast_to_dt(cast.to).ok().map(|t| Arc::new(t.into_owned()))
}

/// The values of a constant outlet as f32.
pub(super) fn floats(model: &TypedModel, outlet: OutletId) -> Option<Vec<f32>> {
    let t = constant(model, outlet)?.cast_to::<f32>().ok()?.into_owned();
    Some(t.to_plain_array_view::<f32>().ok()?.iter().copied().collect())
}

/// The values of a constant outlet as i64.
pub(super) fn integers(model: &TypedModel, outlet: OutletId) -> Option<Vec<i64>> {
    let t = constant(model, outlet)?.cast_to::<i64>().ok()?.into_owned();
    Some(t.to_plain_array_view::<i64>().ok()?.iter().copied().collect())
}

/// For the inputs `(a, b)` of a binary op with one constant side: (the other side, the
/// constant's values as f32).
pub(super) fn with_constant(
    model: &TypedModel,
    (a, b): (OutletId, OutletId),
) -> Option<(OutletId, Vec<f32>)> {
    floats(model, b).map(|c| (a, c)).or_else(|| floats(model, a).map(|c| (b, c)))
}
