//! Adam moments and the update rule shared by every method.
//!
//! The same code serves full-size AdamW moments and the low-rank moments of each subspace, so
//! `gems` with an identity projection and `full` agree to rounding. The form is the one of the
//! authors' (GaLore's, Hugging Face's) AdamW:
//!
//! ```text
//! M <- b1 M + (1 - b1) R            V <- b2 V + (1 - b2) R^2         N = M / (sqrt(V) + eps)
//! W <- W - lr * c_t * U             c_t = sqrt(1 - b2^t) / (1 - b1^t)
//! W <- W - lr * wd * W              (decoupled weight decay, on the updated W)
//! ```
//! where U = N for AdamW and the gated sum of back-projected N for the subspace methods.

use burn::tensor::Tensor;

/// First and second Adam moments of one tensor, on that tensor's device.
#[derive(Debug, Clone)]
pub struct AdamMoments<const D: usize> {
    /// First moment M.
    pub first: Tensor<D>,
    /// Second moment V.
    pub second: Tensor<D>,
}

impl<const D: usize> AdamMoments<D> {
    /// Zero moments of `like`'s shape and device.
    pub fn zeros_like(like: &Tensor<D>) -> Self {
        Self { first: like.zeros_like(), second: like.zeros_like() }
    }

    /// Checks that the moments have `gradient`'s shape (state restored from a file may not).
    ///
    /// # Errors
    /// [`OptimError::MomentShape`] naming `path`.
    pub fn check_shape(&self, gradient: &Tensor<D>, path: &str) -> crate::error::Result<()> {
        let want = gradient.dims();
        for m in [&self.first, &self.second] {
            if m.dims() != want {
                return Err(crate::error::OptimError::MomentShape {
                    path: path.to_string(),
                    moment: m.dims().to_vec(),
                    gradient: want.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Folds `gradient` into the moments; returns them with the normalised step
    /// N = M / (sqrt(V) + eps).
    ///
    /// Takes the moments (and the gradient) by value: on flex one fused pass then writes M, V
    /// and N into their buffers where the step holds them alone ([`crate::fused`]); elsewhere
    /// [`Self::advance_ops`] runs. The arithmetic, and so every result, is the same either way.
    pub fn advance(
        self,
        gradient: Tensor<D>,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> (Self, Tensor<D>) {
        match crate::fused::adam_advance(self.first, self.second, gradient, [beta1, beta2, eps]) {
            Ok((first, second, step)) => (Self { first, second }, step),
            Err((first, second, gradient)) => {
                Self { first, second }.advance_ops(gradient, beta1, beta2, eps)
            }
        }
    }

    /// [`Self::advance`] as Burn ops, on any backend (the reference of the fused kernel).
    pub fn advance_ops(
        self,
        gradient: Tensor<D>,
        beta1: f64,
        beta2: f64,
        eps: f64,
    ) -> (Self, Tensor<D>) {
        let first = self.first.mul_scalar(beta1).add(gradient.clone().mul_scalar(1.0 - beta1));
        let second = self.second.mul_scalar(beta2).add(gradient.square().mul_scalar(1.0 - beta2));
        let step = first.clone().div(second.clone().sqrt().add_scalar(eps));
        (Self { first, second }, step)
    }

    /// Number of f32 values held.
    pub fn numel(&self) -> usize {
        2 * self.first.shape().num_elements()
    }
}

/// The bias correction c_t = sqrt(1 - b2^t) / (1 - b1^t) of step t >= 1.
pub fn bias_correction(step: u64, beta1: f64, beta2: f64) -> f64 {
    let t = step as i32;
    (1.0 - beta2.powi(t)).sqrt() / (1.0 - beta1.powi(t))
}

/// W - lr c U, then decoupled weight decay on the result:
/// (W - lr c U)(1 - lr wd) = W (1 - lr wd) - [lr c (1 - lr wd)] U.
pub fn apply_update<const D: usize>(
    weight: Tensor<D>,
    update: Tensor<D>,
    lr: f64,
    correction: f64,
    weight_decay: f64,
) -> Tensor<D> {
    apply_scaled_update(
        weight,
        update.mul_scalar(update_scale(lr, correction, weight_decay)),
        lr,
        weight_decay,
    )
}

/// The factor lr c (1 - lr wd) that [`apply_scaled_update`] expects already applied to U.
pub fn update_scale(lr: f64, correction: f64, weight_decay: f64) -> f64 {
    lr * correction * (1.0 - lr * weight_decay)
}

/// W (1 - lr wd) - U', for an update U' already multiplied by [`update_scale`] (the subspace
/// methods fold that factor into their small low-rank factors).
pub fn apply_scaled_update<const D: usize>(
    weight: Tensor<D>,
    scaled_update: Tensor<D>,
    lr: f64,
    weight_decay: f64,
) -> Tensor<D> {
    if weight_decay == 0.0 {
        weight.sub(scaled_update)
    } else {
        weight.mul_scalar(1.0 - lr * weight_decay).sub(scaled_update)
    }
}
