//! ControlNet residuals: what a ControlNet (or several, summed) hands the UNet.

use candle_core::{Result, Tensor};

/// diffusers' `down_block_additional_residuals` and `mid_block_additional_residual`: one
/// tensor per UNet skip connection, in the skip list's order (conv_in's output first), and
/// one for the mid block's output.
#[derive(Debug, Clone)]
pub struct ControlResiduals {
    /// One residual per skip connection, `[B, C_i, h_i, w_i]` (or `[B, C_i, 1, 1]`).
    pub down: Vec<Tensor>,
    /// The mid block residual, `[B, C, h, w]` (or `[B, C, 1, 1]`).
    pub mid: Tensor,
}

/// `a + b`, broadcasting `b` over space when it was pooled to `[B, C, 1, 1]`.
fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() == b.dims() {
        a + b
    } else {
        a.broadcast_add(b)
    }
}

impl ControlResiduals {
    /// Adds `other` element-wise (`MultiControlNetModel` sums its nets' residuals).
    pub fn accumulate(&mut self, other: &ControlResiduals) -> Result<()> {
        if self.down.len() != other.down.len() {
            return Err(candle_core::Error::Msg(format!(
                "cannot sum ControlNet residuals: {} and {} down residuals",
                self.down.len(),
                other.down.len()
            )));
        }
        for (mine, theirs) in self.down.iter_mut().zip(&other.down) {
            *mine = add(mine, theirs)?;
        }
        self.mid = add(&self.mid, &other.mid)?;
        Ok(())
    }

    /// The element-wise sum of several nets' residuals (`None` for none), as diffusers'
    /// `MultiControlNetModel` computes it.
    pub fn sum(parts: impl IntoIterator<Item = ControlResiduals>) -> Result<Option<Self>> {
        let mut parts = parts.into_iter();
        let Some(mut total) = parts.next() else {
            return Ok(None);
        };
        for part in parts {
            total.accumulate(&part)?;
        }
        Ok(Some(total))
    }

    /// Adds the residuals to the UNet's `skips` and to the mid block output `mid`, which it
    /// returns.
    pub(crate) fn add_to(&self, mid: Tensor, skips: &mut [Tensor]) -> Result<Tensor> {
        if self.down.len() != skips.len() {
            return Err(candle_core::Error::Msg(format!(
                "ControlNet gave {} down residuals, the UNet has {} skip connections",
                self.down.len(),
                skips.len()
            )));
        }
        for (i, (skip, residual)) in skips.iter_mut().zip(&self.down).enumerate() {
            *skip = add(skip, residual).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "ControlNet down residual {i} {:?} does not fit skip connection {:?}: {e}",
                    residual.dims(),
                    skip.dims()
                ))
            })?;
        }
        add(&mid, &self.mid)
    }
}
