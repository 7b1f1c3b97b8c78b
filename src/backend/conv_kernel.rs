//! What the tract op of [`super::tract_kernel_op`] needs from a convolution kernel of this
//! crate, without tract: the kernels ([`super::direct_conv`], [`super::quant_conv`]) stay
//! independent of it.

/// Channel counts and kernel size of a packed convolution (stride 1, square kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Input channels.
    pub ci: usize,
    /// Output channels.
    pub co: usize,
    /// Kernel size: 3 (padding 1) or 1.
    pub k: usize,
}

/// A packed NCHW convolution that this crate runs itself: f32 in, f32 out, same plane size.
pub trait ConvKernel: std::fmt::Debug + Send + Sync + 'static {
    /// The op's name in tract plans and profiles.
    const NAME: &'static str;

    /// Channels and kernel size.
    fn shape(&self) -> ConvShape;

    /// Convolves `x` (`n x ci x h x w`) into `y` (`n x co x h x w`), with `bias` (`co` values)
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
}
