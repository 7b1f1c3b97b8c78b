//! Load-time rewrites of tract models: this crate's own ops, the direct convs of
//! [`super::tract_direct`] and the fused GroupNorm of [`super::tract_groupnorm`] (in
//! [`prepare`]), and the workaround below for tract 0.23.9's conv lowering at batch > 1 (in
//! [`optimise`], for the convs left to tract).
//!
//! tract-core's `Conv::codegen` only picks `LazyIm2col` when the conv's batch is 1
//! (`should_use_lazy`: "LazyIm2col's offset tables are built for a single batch").
//! Any batch > 1 falls back to the eager `Im2col` op, which materialises a
//! `[N, K, H*W]` packed scratch (k = C_in*9) per conv: for the 32x32 levels of the
//! denoisers that is tens of MB per call, and it dominated the batch-8 profile.
//!
//! `optimise` splits every float NCHW conv with a concrete batch N > 1 into N
//! batch-1 convs on `Slice`s of the input, concatenated back on axis 0, then runs
//! tract's normal codegen. Each batch-1 conv then gets the lazy im2col path that
//! batch 1 already enjoys. The rest of the graph keeps its batch.
use super::simd::KernelLevel;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::array::{Slice, TypedConcat};
use tract_onnx::tract_core::ops::cnn::Conv;

/// First declutter of a freshly typed model. Below level `tract`, swaps in this crate's ops
/// before it: fused GroupNorms ([`super::tract_groupnorm`]), attention
/// ([`super::tract_attention`]), direct convs ([`super::tract_direct`]) and channel concats
/// ([`super::tract_concat`]) on every other level, int8 convs ([`super::tract_quant`]) at
/// avx512 with VNNI, and in a model with those int8 convs, attention with bf16 products
/// ([`super::attention_bf16`]) where the CPU has AVX-512 BF16. They must come first: declutter
/// rewrites the patterns they match (1x1 convs into einsums, GroupNorm into RmsNorm pieces).
/// After it, the nearest upsamples it lowers `Resize` to are swapped for parallel ones
/// ([`super::tract_upsample`]).
pub fn prepare(mut model: TypedModel, level: KernelLevel) -> TractResult<TypedModel> {
    if level != KernelLevel::Tract {
        let (norms, silus) = super::tract_groupnorm::fuse_group_norms(&mut model, level)?;
        let convs = super::tract_direct::use_direct_convs(&mut model, level)?;
        // The int8 convs first: a model with them gets bf16 attention where the CPU has it.
        let int8 = super::tract_quant::use_quant_convs(&mut model, level)?;
        let adds = super::tract_quant::fuse_adds_into_quant_convs(&mut model)?;
        let (attention, bf16) =
            super::tract_attention::fuse_attention(&mut model, level, int8 > 0)?;
        let attention = if bf16 { format!("{attention} (bf16)") } else { attention.to_string() };
        let concats = super::tract_concat::use_channel_concats(&mut model)?;
        log::debug!(
            "{} kernels: {norms} fused GroupNorms ({silus} with their SiLU), {convs} direct \
             convs, {attention} attention blocks, {int8} int8 convs ({adds} adding to their \
             output), {concats} channel concats",
            level.name()
        );
    }
    let mut model = model.into_decluttered()?;
    // Declutter is what lowers an ONNX `Resize` to the upsample this replaces.
    if level != KernelLevel::Tract {
        let upsamples = super::tract_upsample::use_plane_upsamples(&mut model)?;
        log::debug!("{} kernels: {upsamples} plane upsamples", level.name());
    }
    Ok(model)
}

/// Environment switch: `1` keeps tract's own ops everywhere (to measure what ours change).
pub const TRACT_ONLY_ENV: &str = "DIFFSHIELD_TRACT_ONLY";

/// Whether the runtime uses this crate's kernels in this process: true unless
/// [`TRACT_ONLY_ENV`] is `1`.
pub fn own_kernels_enabled() -> bool {
    !super::switches::enabled(TRACT_ONLY_ENV, false)
}

/// Split batched convs into per-sample convs. Call on a *typed* model whose
/// inputs have a concrete batch (e.g. after `with_input_fact(.., [n,3,32,32])`
/// and `into_typed()`), then it declutters, rewrites, and codegens.
pub fn optimise(mut model: TypedModel) -> TractResult<TypedModel> {
    model.declutter()?;
    split_batched_convs(&mut model)?;
    tile_batch_broadcast_consts(&mut model)?;
    model.optimize()?;
    // codegen creates new broadcasting binary ops (e.g. the conv bias adds it
    // pre-fuses): tile those too and let codegen pick the fast kernels.
    if tile_batch_broadcast_consts(&mut model)? > 0 {
        model.optimize()?;
    }
    Ok(model)
}

/// tract's fast binary kernels (`OptBinByScalar`, `OptBinChain`) need the leading
/// axes of both operands to match exactly. A per-channel parameter `[1,C,1,1]`
/// against a batched activation `[N,C,H,W]` (GroupNorm's gamma/beta, conv biases)
/// broadcasts on axis 0 *and* on H,W, so with N > 1 it falls to the generic
/// broadcasting `Mul`/`Add`. Tiling the constant to `[N,C,1,1]` restores the fast
/// path (it is what batch 1 gets for free). Returns the number of consts tiled.
pub fn tile_batch_broadcast_consts(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::TypedBinOp;
    let mut count = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        if node.op_as::<TypedBinOp>().is_none() || node.inputs.len() != 2 {
            continue;
        }
        let facts: Vec<TypedFact> = model.node_input_facts(id)?.into_iter().cloned().collect();
        for (k, other) in [(0usize, 1usize), (1, 0)] {
            let (kf, of) = (&facts[k], &facts[other]);
            let Some(konst) = kf.konst.clone() else { continue };
            let Some(oshape) = of.shape.as_concrete() else { continue };
            if konst.rank() != oshape.len()
                || konst.rank() < 2
                || konst.shape()[0] != 1
                || oshape[0] <= 1
            {
                continue;
            }
            if konst.len() == 1 {
                continue; // true scalar: already handled by the by-scalar path
            }
            let mut target: Vec<usize> = konst.shape().to_vec();
            target[0] = oshape[0];
            let tiled = konst.broadcast_to_shape(&target)?;
            let name = format!("{}.tiled{}", node.name, k);
            let mut patch = TypedModelPatch::new(format!("tile-batch-const {}", node.name));
            let mut inputs = patch.taps(model, &node.inputs)?;
            inputs[k] = patch.add_const(name, tiled)?;
            let out = patch.wire_node(&node.name, node.op.clone(), &inputs)?[0];
            replace_node(model, patch, id, out)?;
            count += 1;
            break;
        }
    }
    model.compact()?;
    Ok(count)
}

/// The rewrite alone, on a decluttered typed model. Returns the number of convs split.
pub fn split_batched_convs(model: &mut TypedModel) -> TractResult<usize> {
    let mut count = 0;
    let ids: Vec<usize> = model.eval_order()?;
    for id in ids {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else { continue };
        if conv.q_params.is_some() || !conv.pool_spec.data_format.has_n() {
            continue;
        }
        let input_fact = model.outlet_fact(node.inputs[0])?;
        let Some(shape) = input_fact.shape.as_concrete() else { continue };
        let n = shape[0];
        if n <= 1 {
            continue;
        }
        let conv = conv.clone();
        let name = node.name.clone();
        let mut patch = TypedModelPatch::new(format!("split-batch-conv {name}"));
        let taps = patch.taps(model, &node.inputs)?;
        let mut outs = tvec!();
        for b in 0..n {
            let x = patch.wire_node(
                format!("{name}.b{b}.slice"),
                Slice::new(0, b, b + 1),
                &[taps[0]],
            )?[0];
            let mut inputs = taps.clone();
            inputs[0] = x;
            outs.push(patch.wire_node(format!("{name}.b{b}"), conv.clone(), &inputs)?[0]);
        }
        let y = patch.wire_node(format!("{name}.concat"), TypedConcat::new(0), &outs)?[0];
        replace_node(model, patch, id, y)?;
        count += 1;
    }
    model.compact()?;
    Ok(count)
}

/// Replaces every node that `find` matches (its single output) by one node of the op `find`
/// returns, wired to the outlets it returns and named `<old name>.<label>`. Returns how many
/// it replaced. The shared loop of the pattern passes (direct convs, GroupNorm, attention,
/// int8 convs).
pub(super) fn replace_matches<O: TypedOp>(
    model: &mut TypedModel,
    label: &str,
    mut find: impl FnMut(&TypedModel, usize) -> TractResult<Option<(TVec<OutletId>, O)>>,
) -> TractResult<usize> {
    let mut count = 0;
    for id in model.eval_order()? {
        let Some((inputs, op)) = find(model, id)? else { continue };
        let name = format!("{}.{label}", model.node(id).name);
        let mut patch = TypedModelPatch::new(format!("{label} {name}"));
        let taps =
            inputs.iter().map(|&i| patch.tap_model(model, i)).collect::<TractResult<TVec<_>>>()?;
        let y = patch.wire_node(name, op, &taps)?[0];
        replace_node(model, patch, id, y)?;
        count += 1;
    }
    model.compact()?;
    Ok(count)
}

/// Applies `patch`, in which `replacement` computes what node `id`'s single output did: its
/// readers are moved over and the node removed.
pub(super) fn replace_node(
    model: &mut TypedModel,
    mut patch: TypedModelPatch,
    id: usize,
    replacement: OutletId,
) -> TractResult<()> {
    patch.shunt_outside(model, OutletId::new(id, 0), replacement)?;
    patch.obliterate(id)?;
    patch.apply(model)
}
