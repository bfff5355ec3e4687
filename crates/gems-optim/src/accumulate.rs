//! Gradient accumulation over micro-batches.
//!
//! Each micro-batch gradient is a mean over its rows. The window's gradient is the
//! sample-weighted mean sum_i n_i G_i / sum_i n_i, which equals the gradient of one batch made
//! of all the rows (up to float error), and the window's loss is weighted the same way. Keep
//! one [`GradientWindow`] per task.
//!
//! A window of one micro-batch (the CPU preset's case) is that micro-batch's gradient, taken
//! over as it is: no pass over it and no copy. Micro-batch gradients are consumed, so the
//! weighting runs in place on tensors nobody else holds.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::optimizer::TaskGradient;

/// Accumulates one task's micro-batch gradients into a window mean.
#[derive(Debug, Default)]
pub struct GradientWindow {
    /// The first micro-batch's gradient as it came while the window holds one micro-batch;
    /// from the second on, sum_i n_i G_i.
    sum: GradientsParams,
    samples: usize,
    loss_sum: f64,
    micro_batches: usize,
}

impl GradientWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rows accumulated so far.
    pub fn samples(&self) -> usize {
        self.samples
    }

    /// Adds a micro-batch (its mean gradient, rows and mean loss). `module` names the
    /// parameters to look up; parameters without a gradient are skipped.
    pub fn add<M: Module>(&mut self, module: &M, micro: TaskGradient) {
        let TaskGradient { mut grads, samples, loss } = micro;
        if samples == 0 {
            return;
        }
        if self.micro_batches == 0 {
            self.sum = grads;
        } else {
            if self.micro_batches == 1 {
                // The first micro-batch joins the weighted sum.
                let mut scaler = Scaler { grads: &mut self.sum, factor: self.samples as f64 };
                module.visit(&mut scaler);
            }
            let mut adder = Adder { sum: &mut self.sum, micro: &mut grads, weight: samples as f64 };
            module.visit(&mut adder);
        }
        self.micro_batches += 1;
        self.samples += samples;
        self.loss_sum += loss * samples as f64;
    }

    /// The window mean, or None when nothing was added.
    pub fn finish<M: Module>(self, module: &M) -> Option<TaskGradient> {
        if self.samples == 0 {
            return None;
        }
        let mut grads = self.sum;
        if self.micro_batches > 1 {
            let mut scaler = Scaler { grads: &mut grads, factor: 1.0 / self.samples as f64 };
            module.visit(&mut scaler);
        }
        Some(TaskGradient {
            grads,
            samples: self.samples,
            loss: self.loss_sum / self.samples as f64,
        })
    }
}

struct Adder<'a> {
    sum: &'a mut GradientsParams,
    micro: &'a mut GradientsParams,
    weight: f64,
}

impl ModuleVisitor for Adder<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(g) = self.micro.remove::<D>(param.id) else { return };
        let g = g.mul_scalar(self.weight);
        let total = match self.sum.remove::<D>(param.id) {
            Some(acc) => acc.add(g),
            None => g,
        };
        self.sum.register(param.id, total);
    }
}

struct Scaler<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl ModuleVisitor for Scaler<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, g.mul_scalar(self.factor));
        }
    }
}
