//! Step-size schedules for the coefficients (spec §3.5, §3.6).

/// How the learning rate evolves over the S inner steps of one model batch.
#[derive(Clone, Debug, PartialEq)]
pub enum StepSchedule {
    /// η at every step.
    Constant,
    /// The authors' schedule, restarted for every model batch: linear warm-up over
    /// W = floor(warmup_fraction · S) steps, lr_s = η (s+1)/W, then cosine decay
    /// lr_s = η · ½ (1 + cos(π (s−W)/(S−W))).
    WarmupCosine {
        /// The fraction of the steps that warm up.
        warmup_fraction: f64,
    },
    /// The step size of the convergence theorem (spec §3.6), for plain SGD: the constant
    /// η = min(1/β, scale/√T), with T the number of inner steps of the whole run (every outer pass
    /// and model batch: the theorem counts the iterations of the whole block coordinate method).
    /// β is the smoothness constant of F; when `smoothness` is `None` it is estimated at the start
    /// of every model batch by a secant along the gradient (see [`crate::mehl`]). The configured
    /// learning rate is not used.
    ConvergenceRate {
        /// β, or `None` to estimate it.
        smoothness: Option<f64>,
        /// c of c/√T.
        scale: f64,
    },
}

impl Default for StepSchedule {
    fn default() -> Self {
        StepSchedule::WarmupCosine {
            warmup_fraction: 0.2,
        }
    }
}

impl StepSchedule {
    /// The learning rate at inner step `s` of `steps` (S), for base rate `eta`.
    /// For `ConvergenceRate`, `eta` is the rate already resolved by [`Self::convergence_rate`].
    pub fn lr(&self, eta: f64, s: usize, steps: usize) -> f64 {
        match *self {
            StepSchedule::Constant | StepSchedule::ConvergenceRate { .. } => eta,
            StepSchedule::WarmupCosine { warmup_fraction } => {
                let w = (warmup_fraction * steps as f64).floor() as usize;
                if s < w {
                    eta * (s + 1) as f64 / w as f64
                } else {
                    let progress = (s - w) as f64 / (steps - w) as f64;
                    eta * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
                }
            }
        }
    }

    /// η = min(1/β, scale/√T) of spec §3.6. A β that is zero, negative or not finite carries no
    /// information and leaves scale/√T.
    pub fn convergence_rate(smoothness: f64, scale: f64, total_steps: usize) -> f64 {
        let by_t = scale / (total_steps.max(1) as f64).sqrt();
        if smoothness.is_finite() && smoothness > 0.0 {
            by_t.min(1.0 / smoothness)
        } else {
            by_t
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_cosine_endpoints() {
        let s = StepSchedule::default();
        // S = 10, W = 2.
        assert_eq!(s.lr(1.0, 0, 10), 0.5);
        assert_eq!(s.lr(1.0, 1, 10), 1.0);
        assert_eq!(s.lr(1.0, 2, 10), 1.0);
        assert!((s.lr(1.0, 6, 10) - 0.5).abs() < 1e-15);
        // No warm-up when W = 0.
        assert_eq!(s.lr(0.3, 0, 3), 0.3);
    }

    #[test]
    fn convergence_rate_is_the_minimum() {
        assert_eq!(StepSchedule::convergence_rate(10.0, 1.0, 4), 0.1);
        assert_eq!(StepSchedule::convergence_rate(1.0, 1.0, 100), 0.1);
        assert_eq!(StepSchedule::convergence_rate(f64::NAN, 2.0, 16), 0.5);
    }
}
