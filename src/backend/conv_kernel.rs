//! What the tract op of [`super::tract_kernel_op`] needs from a convolution kernel of this
//! crate, without tract: the kernels ([`super::direct_conv`], [`super::quant_conv`]) stay
//! independent of it.

/// Channel counts, kernel size and stride of a packed convolution (square kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels.
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel size: 3 (padding 1) or 1.
    pub k: usize,
    /// Stride in both directions: 1, or 2 for 3x3 kernels.
    pub stride: usize,
}

impl ConvShape {
    /// The output plane `(rows, columns)` for an `h x w` input plane: the input plane at
    /// stride 1, `ceil(h / 2) x ceil(w / 2)` for a 3x3 kernel (padding 1) at stride 2; an empty
    /// plane gives an empty one.
    pub fn out_plane(&self, h: usize, w: usize) -> (usize, usize) {
        let s = self.stride.max(1);
        (h.div_ceil(s), w.div_ceil(s))
    }
}

/// A tensor added to a conv's output as it is written: the residual and time-embedding adds
/// that follow the denoisers' convs, done without a pass of their own.
#[derive(Debug, Clone, Copy)]
pub enum Addend<'a> {
    /// `n x co` values: one per image and output channel, added to its whole plane.
    PerChannel(&'a [f32]),
    /// `n x co` output planes: one value per output value.
    Full(&'a [f32]),
}

/// Which [`Addend`] a tract op hands its kernel (its second input).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddendKind {
    /// [`Addend::PerChannel`].
    PerChannel,
    /// [`Addend::Full`].
    Full,
}

/// A packed NCHW convolution that this crate runs itself: f32 in, f32 out, the plane size of
/// [`ConvShape::out_plane`].
pub trait ConvKernel: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name in tract plans and profiles.
    const NAME: &'static str;

    /// Channels and kernel size.
    fn shape(&self) -> ConvShape;

    /// Convolves `x` (`n x ci x h x w`) into `y` (`n x co` planes of [`ConvShape::out_plane`]
    /// of `h x w`), with `bias` (`co` values)
    /// computed at run time instead of the packed one when given. Errors name the mismatch.
    fn run(
        &self,
        x: &[f32],
        n: usize,
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) -> Result<(), String>;

    /// Convolves as [`ConvKernel::run`] with the packed bias, then adds `addend` to every
    /// output value (rounded once after the conv's own rounding, as a separate add would be).
    /// Kernels without it refuse.
    fn run_with_addend(
        &self,
        _x: &[f32],
        _n: usize,
        _h: usize,
        _w: usize,
        _addend: Addend<'_>,
        _y: &mut [f32],
    ) -> Result<(), String> {
        Err(format!("{}: adding to the output is not supported", Self::NAME))
    }
}

#[cfg(test)]
mod tests {
    use super::ConvShape;

    #[test]
    fn output_planes_follow_the_stride_and_an_empty_plane_stays_empty() {
        let at = |k, stride| ConvShape { ci: 1, co: 1, k, stride };
        assert_eq!(at(3, 1).out_plane(5, 4), (5, 4));
        assert_eq!(at(1, 1).out_plane(1, 1), (1, 1));
        assert_eq!(at(3, 2).out_plane(5, 4), (3, 2));
        assert_eq!(at(3, 2).out_plane(1, 1), (1, 1));
        assert_eq!(at(3, 2).out_plane(0, 7), (0, 4));
        assert_eq!(at(1, 1).out_plane(3, 0), (3, 0));
    }
}
