//! Fuses the denoisers' exported GroupNorm into one tract op.
//!
//! PyTorch exports `GroupNorm` as eleven ONNX nodes (reshape to `[n, G, L]`, mean, subtract,
//! square, mean, add eps, sqrt, divide, reshape back, scale, shift). tract keeps them as five
//! to six separate passes over the activation (Reduce, Sub, RmsNorm, Mul+Add), about 13 % of a
//! denoiser_s call. [`GroupNormOp`] reads each group twice (sum, then squared deviations) and
//! writes it once with the scale and shift folded per channel, and the SiLU (`x * sigmoid(x)`)
//! that follows 35 of the 41 norms in the denoisers folded into that write: tract's Silu is one
//! more pass over the activation, on one thread (it was 1.8 ms of a 78 ms batch-8 denoiser_s
//! call on one thread, and did not get faster with two). The write runs on the level's vectors
//! ([`Simd`], with its `exp`), so each level rounds in its own way; any thread count gives the
//! same bits.
//!
//! The passes match the exact typed pattern of a freshly typed model (before declutter
//! rewrites it) and leave anything that differs untouched, so a model exported another way
//! simply keeps tract's ops.

#[cfg(target_arch = "x86_64")]
use super::simd::{Avx2, Avx512, PortableFma};
use super::simd::{KernelLevel, Portable, Simd};
use super::tract_match::{binary, floats, producer, with_constant};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// `y = (x - mean_g) / sqrt(var_g + eps) * gamma_c + beta_c` over `[n, C, ...]` f32, groups
/// of `C / groups` consecutive channels; with `silu`, `y * sigmoid(y)` of that.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormOp {
    groups: usize,
    eps: f32,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    silu: bool,
    level: KernelLevel,
}

impl Eq for GroupNormOp {}

impl Op for GroupNormOp {
    fn name(&self) -> StaticName {
        "GroupNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let silu = if self.silu { ", then SiLU" } else { "" };
        let per_group = self.gamma.len() / self.groups;
        Ok(vec![format!(
            "{} groups of {per_group} channels{silu}, {}",
            self.groups,
            self.level.name()
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GroupNormOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let shape = x.shape().to_vec();
        let channels = self.gamma.len();
        ensure!(shape.len() >= 2 && shape[1] == channels, "GroupNorm: input {shape:?}");
        let x = x.as_slice().context("GroupNorm: input is not contiguous")?;
        // SAFETY: `run` writes every value of `y` (one item per (image, group), each writing
        // all of its group) before the tensor is read.
        let mut y = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("GroupNorm: output is not contiguous")?;
            self.run(x, out, shape[0], shape[2..].iter().product());
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for GroupNormOp {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(&*inputs[0].shape)))
    }

    as_op!();
}

impl GroupNormOp {
    /// Normalises `n` images of `channels x plane` values from `x` into `y`, one (image, group)
    /// per item of [`super::par::for_each`].
    fn run(&self, x: &[f32], y: &mut [f32], n: usize, plane: usize) {
        let per_group = self.gamma.len() / self.groups;
        let len = per_group * plane;
        if len == 0 {
            // Empty planes: nothing to normalise, and no item size to divide by.
            return;
        }
        let items = (n * self.groups).min(x.len() / len).min(y.len() / len);
        let out = super::par::SyncPtr(y.as_mut_ptr());
        super::par::for_each(items, |index| {
            // SAFETY: item `index` writes only its own `len` values of `y`, which has at least
            // `items * len` of them, and `y` outlives the call.
            let ys = unsafe { std::slice::from_raw_parts_mut(out.ptr().add(index * len), len) };
            self.group(&x[index * len..(index + 1) * len], ys, index % self.groups, plane);
        });
    }

    /// Normalises one group's `per_group x plane` values.
    fn group(&self, xs: &[f32], ys: &mut [f32], group: usize, plane: usize) {
        let per_group = self.gamma.len() / self.groups;
        let (mean, var) = moments(xs);
        let inv = 1.0 / (var + self.eps as f64).sqrt();
        for (c, (xc, yc)) in xs.chunks_exact(plane).zip(ys.chunks_exact_mut(plane)).enumerate() {
            let channel = group * per_group + c;
            let scale = (self.gamma[channel] as f64 * inv) as f32;
            let shift =
                (self.beta[channel] as f64 - mean * self.gamma[channel] as f64 * inv) as f32;
            let affine = Affine { scale, shift, silu: self.silu };
            // SAFETY: `level` is only `avx512` / `avx2` / `portable-fma` where this CPU has it
            // (the pass is handed a level `KernelLevel::parse` or `best` accepted, and
            // `fuse_group_norms` checks it again); each arm is compiled for its instruction set.
            match self.level {
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx512 => unsafe { affine_avx512(xc, yc, affine) },
                #[cfg(target_arch = "x86_64")]
                KernelLevel::Avx2 => unsafe { affine_avx2(xc, yc, affine) },
                #[cfg(target_arch = "x86_64")]
                KernelLevel::PortableFma => unsafe { affine_portable_fma(xc, yc, affine) },
                _ => unsafe { affine_lanes::<Portable>(xc, yc, affine) },
            }
        }
    }
}

/// One channel's folded normalisation: `y = x * scale + shift`, then SiLU when `silu`.
#[derive(Clone, Copy)]
struct Affine {
    scale: f32,
    shift: f32,
    silu: bool,
}

/// [`affine_lanes`] on AVX-512 vectors.
/// Safety: the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn affine_avx512(xs: &[f32], ys: &mut [f32], a: Affine) {
    affine_lanes::<Avx512>(xs, ys, a)
}

/// [`affine_lanes`] on AVX2 vectors.
/// Safety: the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_avx2(xs: &[f32], ys: &mut [f32], a: Affine) {
    affine_lanes::<Avx2>(xs, ys, a)
}

/// [`affine_lanes`] on [`PortableFma`] vectors, compiled for AVX2 + FMA.
/// Safety: the CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn affine_portable_fma(xs: &[f32], ys: &mut [f32], a: Affine) {
    affine_lanes::<PortableFma>(xs, ys, a)
}

/// [`Affine`] over `xs` into `ys` (the shorter length), `S::LANES` at a time, the rest one by
/// one. Safety: the CPU runs `S` and the caller is compiled for it (see [`super::simd`]).
#[inline(always)]
unsafe fn affine_lanes<S: Simd>(xs: &[f32], ys: &mut [f32], a: Affine) {
    let len = xs.len().min(ys.len());
    let (scale, shift) = (S::splat(a.scale), S::splat(a.shift));
    let (x, y) = (xs.as_ptr(), ys.as_mut_ptr());
    let mut i = 0;
    while i + S::LANES <= len {
        let v = S::fma(S::load(x.add(i)), scale, shift);
        S::store(y.add(i), if a.silu { silu::<S>(v) } else { v });
        i += S::LANES;
    }
    for k in i..len {
        let v = xs[k] * a.scale + a.shift;
        ys[k] = if a.silu { v / (1.0 + (-v.max(-87.0)).exp()) } else { v };
    }
}

/// `v * sigmoid(v) = v / (1 + e^-v)`, with `-v` held to at most 87 (where [`Simd::exp`] is
/// accurate; below v = -87 the result is under 1e-35 either way).
/// Safety: as [`affine_lanes`]: the CPU runs `S` and the caller is compiled for it.
#[inline(always)]
unsafe fn silu<S: Simd>(v: S::V) -> S::V {
    let e = S::exp(S::sub(S::zero(), S::max(v, S::splat(-87.0))));
    S::mul(v, S::recip(S::add(S::splat(1.0), e)))
}

/// Mean and variance of `xs`: the mean, then the squared deviations from it (as f32), each
/// summed by [`lane_sum`]. With AVX-512 the same sums run on 16-lane vectors instead of the
/// x86-64 baseline's four (the lanes add in the same order, so the bits are the same on every
/// level).
fn moments(xs: &[f32]) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        return unsafe { moments_avx512(xs) };
    }
    moments_lanes(xs)
}

/// [`moments_lanes`] compiled for AVX-512F (its sums on 16-lane vectors).
/// Safety: the CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn moments_avx512(xs: &[f32]) -> (f64, f64) {
    moments_lanes(xs)
}

#[inline(always)]
fn moments_lanes(xs: &[f32]) -> (f64, f64) {
    let len = xs.len() as f64;
    let mean = lane_sum(xs, |v| v) / len;
    let m = mean as f32;
    (mean, lane_sum(xs, |v| (v - m) * (v - m)) / len)
}

/// Independent f32 sums of [`lane_sum`]: four AVX-512 vectors. With one vector each add
/// waited for the one before (3 to 4 cycles per 16 values); with four chains the moments took
/// about a quarter less time in `perf` (what is left is mostly waiting on memory), and each
/// lane sums 4x fewer values.
const SUM_LANES: usize = 64;

/// Sum of `f(v)` over `xs` in [`SUM_LANES`] independent f32 lanes (so the compiler
/// vectorises it), folded to 16 lanes in f32 (vector adds) and those combined in f64. (The
/// f64 sum is one chain of dependent adds: over all 64 lanes it would cost a small group,
/// 256 values at the 8x8 level, more than its sum.)
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut lanes = [0f32; SUM_LANES];
    let chunks = xs.chunks_exact(SUM_LANES);
    let rest: f64 = chunks.remainder().iter().map(|&v| f(v) as f64).sum();
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l += f(v);
        }
    }
    let folded: [f32; 16] =
        std::array::from_fn(|i| (lanes[i] + lanes[i + 16]) + (lanes[i + 32] + lanes[i + 48]));
    folded.iter().map(|&l| l as f64).sum::<f64>() + rest
}

/// Replaces every exported GroupNorm pattern of a freshly typed model by a [`GroupNormOp`]
/// on `level`'s vectors, then folds each SiLU that alone reads a norm's output into it.
/// Returns (norms, SiLUs folded). A level this CPU cannot run is an error.
pub fn fuse_group_norms(model: &mut TypedModel, level: KernelLevel) -> TractResult<(usize, usize)> {
    ensure!(level.supported(), "GroupNorm: kernel level {} cannot run on this CPU", level.name());
    let norms = super::tract_opt::replace_matches(model, "group_norm", |model, id| {
        Ok(group_norm_at(model, id, level)?.map(|(input, op)| (tvec![input], op)))
    })?;
    let silus = super::tract_opt::replace_matches(model, "silu", |model, id| {
        Ok(silu_after_norm(model, id).map(|(input, op)| (tvec![input], op)))
    })?;
    Ok((norms, silus))
}

/// Matches `Mul(g, Sigmoid(g))` at node `id` (either operand order) where `g` is the output of
/// a [`GroupNormOp`] without SiLU that nothing else reads: the norm's input and the norm with
/// the SiLU folded in. (The norm and the Sigmoid are left without readers and dropped.)
fn silu_after_norm(model: &TypedModel, id: usize) -> Option<(OutletId, GroupNormOp)> {
    let (a, b) = binary(model, OutletId::new(id, 0), "Mul")?;
    let is_sigmoid_of = |s: OutletId, g: OutletId| {
        producer::<ElementWiseOp>(model, s).is_some_and(|(node, op)| {
            op.name() == "Sigmoid" && node.inputs.as_slice() == [g] && node.outputs.len() == 1
        })
    };
    let (g, s) = if is_sigmoid_of(b, a) {
        (a, b)
    } else if is_sigmoid_of(a, b) {
        (b, a)
    } else {
        return None;
    };
    let (norm, op) = producer::<GroupNormOp>(model, g)?;
    let readers = |o: OutletId| model.outlet_successors(o).len();
    if op.silu || readers(g) != 2 || readers(s) != 1 || model.output_outlets().ok()?.contains(&g) {
        return None;
    }
    Some((norm.inputs[0], GroupNormOp { silu: true, ..op.clone() }))
}

/// `x / count` where `x = ReduceSum(axis 2)(from)`: returns `from` when count is `len`.
fn mean_of(model: &TypedModel, outlet: OutletId, len: usize) -> Option<OutletId> {
    let (sum, count) = binary(model, outlet, "Div")?;
    let count = floats(model, count)?;
    let (node, reduce) = producer::<Reduce>(model, sum)?;
    (count.len() == 1
        && count[0] == len as f32
        && reduce.reducer == Reducer::Sum
        && reduce.axes.as_slice() == [2])
    .then_some(node.inputs[0])
}

/// Matches the exported GroupNorm ending at node `id` (the shift's Add): the normalised input
/// and the fused op.
fn group_norm_at(
    model: &TypedModel,
    id: usize,
    level: KernelLevel,
) -> TractResult<Option<(OutletId, GroupNormOp)>> {
    let out = OutletId::new(id, 0);
    let m = || -> Option<(OutletId, GroupNormOp)> {
        let (scaled, beta) = with_constant(model, binary(model, out, "Add")?)?;
        let (reshaped, gamma) = with_constant(model, binary(model, scaled, "Mul")?)?;
        let (back, AxisOp::Reshape(1, _, _)) = producer::<AxisOp>(model, reshaped)? else {
            return None;
        };
        let (centred, std) = binary(model, back.inputs[0], "Div")?;
        let (sqrt, _) = producer::<ElementWiseOp>(model, std)?;
        if sqrt.op.name() != "Sqrt" {
            return None;
        }
        let (var, eps) = with_constant(model, binary(model, sqrt.inputs[0], "Add")?)?;
        let (grouped, mean) = binary(model, centred, "Sub")?;
        let (split, AxisOp::Reshape(1, from, to)) = producer::<AxisOp>(model, grouped)? else {
            return None;
        };
        let (groups, len) = match to.as_slice() {
            [g, l] => (g.to_usize().ok()?, l.to_usize().ok()?),
            _ => return None,
        };
        let channels = from.first()?.to_usize().ok()?;
        let squared = mean_of(model, var, len)?;
        let (a, b) = binary(model, squared, "Mul")?;
        let ok = a == centred
            && b == centred
            && mean_of(model, mean, len)? == grouped
            && eps.len() == 1
            && groups > 0
            && channels % groups == 0
            && gamma.len() == channels
            && beta.len() == channels
            && model.outlet_fact(split.inputs[0]).ok()?.datum_type == f32::datum_type();
        let op = GroupNormOp { groups, eps: eps[0], gamma, beta, silu: false, level };
        ok.then(|| (split.inputs[0], op))
    };
    Ok(m())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_group_applies_the_channel_affine_and_the_silu_on_every_level() {
        // 2 images, 4 channels in 2 groups; planes of 20 pixels (a vector and a tail on every
        // level) and of 3 (shorter than any vector: the tail alone).
        for plane in [20, 3] {
            let x: Vec<f32> = (0..2 * 4 * plane).map(|i| ((i * 7) % 11) as f32 - 3.0).collect();
            for level in crate::backend::simd::levels_under_test() {
                for silu in [false, true] {
                    let op = GroupNormOp {
                        groups: 2,
                        eps: 1e-5,
                        gamma: vec![1.0, 2.0, 0.5, -1.0],
                        beta: vec![0.0, 1.0, -1.0, 0.25],
                        silu,
                        level,
                    };
                    let [a, b, c] = super::super::par::on_thread_counts(|| {
                        let mut y = vec![0f32; x.len()];
                        op.run(&x, &mut y, 2, plane);
                        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    });
                    let case = format!("{} plane {plane}, silu {silu}", level.name());
                    assert!(a == b && a == c, "{case}: thread counts change the bits");
                    let len = 2 * plane;
                    for (i, g) in x.chunks(len).enumerate() {
                        let mean = g.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
                        let var =
                            g.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / len as f64;
                        for (j, &v) in g.iter().enumerate() {
                            let ch = (i % 2) * 2 + j / plane;
                            let y = (v as f64 - mean) / (var + 1e-5).sqrt() * op.gamma[ch] as f64
                                + op.beta[ch] as f64;
                            let want = if silu { y / (1.0 + (-y).exp()) } else { y };
                            let got = f32::from_bits(a[i * len + j]) as f64;
                            assert!((got - want).abs() < 1e-5, "{case}: {i}/{j}: {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn empty_planes_are_no_work() {
        let op = GroupNormOp {
            groups: 2,
            eps: 1e-5,
            gamma: vec![1.0; 4],
            beta: vec![0.0; 4],
            silu: true,
            level: KernelLevel::Portable,
        };
        op.run(&[], &mut [], 2, 0);
        op.run(&[], &mut [], 0, 16);
    }
}
