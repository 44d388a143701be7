//! The configuration of `soup mix`: a `recipe.toml`, flags that override it, and the method's
//! defaults for the rest. The resolved recipe is written next to the soup.

use serde::{Deserialize, Serialize};
use soup_core::{
    BlockCut, Directions, GreedyAccept, LearnedConfig, MehlConfig, Method, OptimizerKind,
    StepSchedule, REGISTRY,
};

use crate::error::{CliError, Result};

/// The values `--method` takes: soup-core's method registry, listed with a line each in errors
/// and help.
fn method_parser() -> impl clap::builder::TypedValueParser<Value = Method> {
    use clap::builder::{PossibleValue, TypedValueParser};
    let values = REGISTRY
        .iter()
        .map(|m| PossibleValue::new(m.name).help(m.summary));
    clap::builder::PossibleValuesParser::new(values)
        .map(|name| name.parse::<Method>().expect("a listed method name"))
}

/// The coefficient optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

/// The step schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleName {
    /// Linear warm-up, then cosine decay.
    Cosine,
    Constant,
    /// c/√T with the smoothness β (spec §3.6).
    ConvergenceRate,
}

/// The loss a multi-task merge learns its coefficients on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskLossName {
    /// AdaMerging's: the entropy of the predictions on each task's unlabelled test inputs.
    Entropy,
    /// Labelled cross-entropy on each task's held-out split.
    CrossEntropy,
}

/// When Greedy keeps a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcceptName {
    /// Held-out accuracy improves (model-soups' code).
    Improves,
    /// Held-out accuracy does not drop (the paper's text).
    NotWorse,
}

/// The dtype MEHL stores its directions in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectionDtypeName {
    /// The models' own dtype.
    Model,
    /// bfloat16: half the memory of f32 directions, 8 significant bits.
    Bf16,
    /// IEEE half: half the memory, 11 significant bits, range ±65504 (directions have unit
    /// norm, so their elements are within it).
    F16,
    F32,
}

impl DirectionDtypeName {
    /// The dtype, `None` for the models' own.
    pub fn dtype(self) -> Option<candle_core::DType> {
        use candle_core::DType;
        match self {
            DirectionDtypeName::Model => None,
            DirectionDtypeName::Bf16 => Some(DType::BF16),
            DirectionDtypeName::F16 => Some(DType::F16),
            DirectionDtypeName::F32 => Some(DType::F32),
        }
    }
}

/// How MEHL scales its directions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirectionsName {
    /// (θ_i − c)/‖θ_i − c‖ per block: the authors'.
    Unit,
    /// θ_i − c: X is the change of α, so every block's α moves at the same rate.
    Difference,
}

/// Every knob of `soup mix`. In a file or on the command line, any may be left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Soup method. mergekit's data-free merges (linear, task_arithmetic, ties, dare_linear,
    /// dare_ties, breadcrumbs, breadcrumbs_ties, della, della_linear, model_stock, slerp,
    /// nuslerp) are `soup merge CONFIG`.
    #[arg(long, value_parser = method_parser())]
    pub method: Option<Method>,
    /// MEHL: models per model batch (b).
    #[arg(long)]
    pub model_batch: Option<usize>,
    /// MEHL: passes over all models.
    #[arg(long)]
    pub outer_passes: Option<usize>,
    /// MEHL: epochs over the held-out data per model batch; Learned: epochs.
    #[arg(long)]
    pub inner_epochs: Option<usize>,
    /// Peak learning rate of the coefficients.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Weight decay on the coefficients.
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Coefficient optimizer.
    #[arg(long, value_enum)]
    pub optimizer: Option<OptimizerName>,
    /// SGD momentum.
    #[arg(long)]
    pub momentum: Option<f64>,
    /// Step schedule.
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleName>,
    /// Warm-up fraction of the cosine schedule.
    #[arg(long)]
    pub warmup_fraction: Option<f64>,
    /// Convergence-rate schedule: the smoothness β (estimated when absent).
    #[arg(long)]
    pub smoothness: Option<f64>,
    /// Convergence-rate schedule: the scale c of c/√T.
    #[arg(long)]
    pub rate_scale: Option<f64>,
    /// Clip ∇θ to this global L2 norm; 0 turns clipping off.
    #[arg(long)]
    pub clip_grad_norm: Option<f64>,
    /// Block cut: tensor, whole, layer, or size:S (the authors' layer_size).
    #[arg(long)]
    pub block_cut: Option<String>,
    /// Seed of model and data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Held-out mini-batch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Label smoothing of the held-out loss.
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// Greedy: keep a model when accuracy improves (model-soups code) or does not drop (paper).
    #[arg(long, value_enum)]
    pub greedy_accept: Option<AcceptName>,
    /// Learned and MEHL: keep the α of blocks whose gradient is identically zero (a CLIP key
    /// bias, which softmax cancels) instead of letting the optimizer amplify rounding noise.
    #[arg(long)]
    pub freeze_zero_gradient: Option<bool>,
    /// MEHL: the dtype the directions are stored in (bf16/f16: half the memory of f32; the
    /// soup is then recomputed from the models and α at the end).
    #[arg(long, value_enum)]
    pub direction_dtype: Option<DirectionDtypeName>,
    /// MEHL: normalise each direction (unit, the authors') or keep the models' differences
    /// from the center (difference: X is the change of α, so a tensor the models barely
    /// change does not get an extreme α; docs/MEHL-SOUP.md §3.4).
    #[arg(long, value_enum)]
    pub directions: Option<DirectionsName>,
    /// AdaMerging: the first λ of every task model (the soup θ_0 + prior · Σ τ_k).
    #[arg(long)]
    pub prior: Option<f64>,
    /// AdaMerging: clamp λ into [0, 1] in the forward pass, as AdaMerging does.
    #[arg(long)]
    pub clamp: Option<bool>,
    /// AdaMerging: the loss λ is learned on.
    #[arg(long, value_enum)]
    pub task_loss: Option<TaskLossName>,
    /// TIES: the fraction of each task vector's entries kept (by magnitude).
    #[arg(long)]
    pub density: Option<f64>,
}

impl Recipe {
    /// `self` with the fields `over` sets replaced.
    pub fn overridden_by(self, over: &Recipe) -> Recipe {
        macro_rules! pick {
            ($($f:ident),*) => { Recipe { $($f: over.$f.clone().or(self.$f),)* } };
        }
        pick!(
            method,
            model_batch,
            outer_passes,
            inner_epochs,
            lr,
            weight_decay,
            optimizer,
            momentum,
            schedule,
            warmup_fraction,
            smoothness,
            rate_scale,
            clip_grad_norm,
            block_cut,
            seed,
            batch_size,
            label_smoothing,
            greedy_accept,
            freeze_zero_gradient,
            direction_dtype,
            directions,
            prior,
            clamp,
            task_loss,
            density
        )
    }

    /// Fills every unset field with the method's default (the authors' run for MEHL, model-soups
    /// for Learned), so the written recipe says exactly what ran.
    pub fn resolved(self) -> Result<Recipe> {
        let method = self.method.ok_or_else(|| {
            CliError::new(format!(
                "--method is required ({})",
                Method::names().join(", ")
            ))
        })?;
        if method.is_multitask() {
            return self.resolved_multitask(method);
        }
        let learned = method.is_learned();
        let mehl = Method::mehl_defaults();
        let lc = Method::learned_defaults();
        let r = Recipe {
            method: Some(method),
            model_batch: self.model_batch.or(Some(mehl.model_batch)),
            outer_passes: self.outer_passes.or(Some(mehl.outer_passes)),
            inner_epochs: self.inner_epochs.or(Some(if learned {
                lc.epochs
            } else {
                mehl.inner_epochs
            })),
            lr: self.lr.or(Some(if learned { lc.lr } else { mehl.lr })),
            weight_decay: self.weight_decay.or(Some(0.0)),
            optimizer: self.optimizer.or(Some(OptimizerName::Adamw)),
            momentum: self.momentum.or(Some(0.9)),
            schedule: self.schedule.or(Some(if learned {
                ScheduleName::Constant
            } else {
                ScheduleName::Cosine
            })),
            warmup_fraction: self.warmup_fraction.or(Some(0.2)),
            smoothness: self.smoothness,
            rate_scale: self.rate_scale.or(Some(1.0)),
            clip_grad_norm: self.clip_grad_norm.or(Some(1.0)),
            block_cut: self.block_cut.or(Some(
                if method.default_block_cut() == BlockCut::WHOLE {
                    "whole"
                } else {
                    "tensor"
                }
                .into(),
            )),
            seed: self.seed.or(Some(1)),
            batch_size: self.batch_size.or(Some(128)),
            label_smoothing: self.label_smoothing.or(Some(0.0)),
            greedy_accept: self.greedy_accept.or(Some(AcceptName::Improves)),
            freeze_zero_gradient: self.freeze_zero_gradient.or(Some(true)),
            direction_dtype: self.direction_dtype.or(Some(DirectionDtypeName::Model)),
            directions: self.directions.or(Some(DirectionsName::Unit)),
            prior: None,
            clamp: None,
            task_loss: None,
            density: None,
        };
        if self.prior.is_some() || self.clamp.is_some() || self.task_loss.is_some() {
            return Err(CliError::new(format!(
                "--prior, --clamp and --task-loss are settings of adamerging and adamerging+, not {}",
                method.name()
            )));
        }
        if self.density.is_some() {
            return Err(CliError::new("--density is a setting of ties"));
        }
        // Parse everything now, so a bad value fails before any work.
        r.cut()?;
        if method.is_mehl() {
            r.mehl_config(&[])?.validate()?;
        } else if method.is_learned() {
            r.learned_config(&[])?.validate()?;
        }
        if r.batch_size == Some(0) {
            return Err(CliError::new("--batch-size must be at least 1"));
        }
        if let Some(s) = r.label_smoothing.filter(|s| !(0.0..1.0).contains(s)) {
            return Err(CliError::new(format!(
                "--label-smoothing {s}: must be in [0, 1)"
            )));
        }
        if let Some(c) = r.clip_grad_norm.filter(|c| !(c.is_finite() && *c >= 0.0)) {
            return Err(CliError::new(format!(
                "--clip-grad-norm {c}: must be a positive number, or 0 to turn clipping off"
            )));
        }
        Ok(r)
    }

    /// The defaults of the multi-task merges: AdaMerging's (Adam at a constant 1e-3, no
    /// clipping, prior 0.3, λ clamped into [0, 1], entropy, batches of 16 per task, one epoch);
    /// the model batch stays unset until the number of tasks is known (all of them by default).
    fn resolved_multitask(self, method: Method) -> Result<Recipe> {
        let ada = method.is_adamerging();
        let r = Recipe {
            method: Some(method),
            model_batch: self.model_batch.filter(|_| ada),
            outer_passes: self.outer_passes.or(Some(1)).filter(|_| ada),
            inner_epochs: self.inner_epochs.or(Some(1)).filter(|_| ada),
            lr: self.lr.or(Some(1e-3)).filter(|_| ada),
            weight_decay: self.weight_decay.or(Some(0.0)).filter(|_| ada),
            optimizer: self
                .optimizer
                .or(Some(OptimizerName::Adamw))
                .filter(|_| ada),
            momentum: self.momentum.or(Some(0.9)).filter(|_| ada),
            schedule: self
                .schedule
                .or(Some(ScheduleName::Constant))
                .filter(|_| ada),
            warmup_fraction: self.warmup_fraction.or(Some(0.2)).filter(|_| ada),
            smoothness: self.smoothness.filter(|_| ada),
            rate_scale: self.rate_scale.or(Some(1.0)).filter(|_| ada),
            clip_grad_norm: self.clip_grad_norm.or(Some(0.0)).filter(|_| ada),
            block_cut: self
                .block_cut
                .or(Some(
                    if method.default_block_cut() == BlockCut::WHOLE {
                        "whole"
                    } else {
                        "tensor"
                    }
                    .into(),
                ))
                .filter(|_| ada),
            seed: self.seed.or(Some(1)),
            batch_size: self.batch_size.or(Some(16)),
            label_smoothing: self.label_smoothing.or(Some(0.0)),
            greedy_accept: None,
            freeze_zero_gradient: self.freeze_zero_gradient.or(Some(true)).filter(|_| ada),
            direction_dtype: self
                .direction_dtype
                .or(Some(DirectionDtypeName::Model))
                .filter(|_| ada),
            directions: None,
            prior: self.prior.or(Some(0.3)).filter(|_| ada),
            clamp: self.clamp.or(Some(true)).filter(|_| ada),
            task_loss: self
                .task_loss
                .or(Some(TaskLossName::Entropy))
                .filter(|_| ada),
            density: self
                .density
                .or(Some(0.2))
                .filter(|_| method == Method::Ties),
        };
        if self.directions.is_some() {
            return Err(CliError::new(format!(
                "--directions is a setting of mehl and mehl+; {}'s directions are task vectors",
                method.name()
            )));
        }
        if r.batch_size == Some(0) {
            return Err(CliError::new("--batch-size must be at least 1"));
        }
        if let Some(d) = r.density.filter(|d| !(*d > 0.0 && *d <= 1.0)) {
            return Err(CliError::new(format!("--density {d}: must be in (0, 1]")));
        }
        if ada {
            r.cut()?;
            r.adamerging_config(&[], 0)?.validate()?;
        }
        Ok(r)
    }

    /// AdaMerging's settings with the base at zoo index `base`.
    pub fn adamerging_config(&self, zero_gradient: &[String], base: usize) -> Result<MehlConfig> {
        let mut c = self.mehl_config(zero_gradient)?;
        c.model_batch = self.model_batch.unwrap_or(usize::MAX);
        c.task_vectors = Some(soup_core::TaskVectors {
            base,
            prior: self.prior.unwrap_or(0.3),
            clamp: self.clamp.unwrap_or(true).then_some((0.0, 1.0)),
        });
        Ok(c)
    }

    pub fn method(&self) -> Method {
        self.method.expect("resolved recipe")
    }

    fn optimizer_kind(&self) -> OptimizerKind {
        match self.optimizer.unwrap_or(OptimizerName::Adamw) {
            OptimizerName::Adamw => OptimizerKind::ADAMW,
            OptimizerName::Sgd => OptimizerKind::Sgd {
                momentum: self.momentum.unwrap_or(0.9),
            },
        }
    }

    fn step_schedule(&self) -> StepSchedule {
        match self.schedule.unwrap_or(ScheduleName::Cosine) {
            ScheduleName::Cosine => StepSchedule::WarmupCosine {
                warmup_fraction: self.warmup_fraction.unwrap_or(0.2),
            },
            ScheduleName::Constant => StepSchedule::Constant,
            ScheduleName::ConvergenceRate => StepSchedule::ConvergenceRate {
                smoothness: self.smoothness,
                scale: self.rate_scale.unwrap_or(1.0),
            },
        }
    }

    fn cut(&self) -> Result<BlockCut> {
        let s = self.block_cut.as_deref().unwrap_or("tensor");
        match s {
            "tensor" => Ok(BlockCut::PER_TENSOR),
            "whole" => Ok(BlockCut::WHOLE),
            "layer" => Ok(BlockCut::PerLayer {
                marker: "layers.".into(),
            }),
            _ => match s.strip_prefix("size:").map(str::parse::<usize>) {
                Some(Ok(size)) => Ok(BlockCut::LayerSize(size)),
                _ => Err(CliError::new(format!(
                    "--block-cut {s:?}: expected tensor, whole, layer or size:S"
                ))),
            },
        }
    }

    pub fn accept(&self) -> GreedyAccept {
        match self.greedy_accept.unwrap_or(AcceptName::Improves) {
            AcceptName::Improves => GreedyAccept::Improves,
            AcceptName::NotWorse => GreedyAccept::NotWorse,
        }
    }

    fn clip(&self) -> Option<f64> {
        self.clip_grad_norm.filter(|&c| c > 0.0)
    }

    /// The tensors to freeze: the architecture's zero-gradient ones, unless turned off.
    fn frozen(&self, zero_gradient: &[String]) -> Vec<String> {
        if self.freeze_zero_gradient.unwrap_or(true) {
            zero_gradient.to_vec()
        } else {
            Vec::new()
        }
    }

    /// MEHL's settings; `zero_gradient` names the architecture's tensors of zero gradient.
    pub fn mehl_config(&self, zero_gradient: &[String]) -> Result<MehlConfig> {
        let d = Method::mehl_defaults();
        Ok(MehlConfig {
            model_batch: self.model_batch.unwrap_or(d.model_batch),
            outer_passes: self.outer_passes.unwrap_or(d.outer_passes),
            inner_epochs: self.inner_epochs.unwrap_or(d.inner_epochs),
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            optimizer: self.optimizer_kind(),
            schedule: self.step_schedule(),
            clip_grad_norm: self.clip(),
            block_cut: self.cut()?,
            frozen_tensors: self.frozen(zero_gradient),
            seed: self.seed.unwrap_or(d.seed),
            evaluate_each_model_batch: true,
            direction_dtype: self.direction_dtype.and_then(DirectionDtypeName::dtype),
            directions: match self.directions.unwrap_or(DirectionsName::Unit) {
                DirectionsName::Unit => Directions::Unit,
                DirectionsName::Difference => Directions::Difference,
            },
            task_vectors: None,
        })
    }

    /// Learned-Soup's settings; `zero_gradient` as for [`Recipe::mehl_config`].
    pub fn learned_config(&self, zero_gradient: &[String]) -> Result<LearnedConfig> {
        let d = Method::learned_defaults();
        Ok(LearnedConfig {
            epochs: self.inner_epochs.unwrap_or(d.epochs),
            lr: self.lr.unwrap_or(d.lr),
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            optimizer: self.optimizer_kind(),
            schedule: self.step_schedule(),
            block_cut: self.cut()?,
            frozen_tensors: self.frozen(zero_gradient),
            seed: self.seed.unwrap_or(d.seed),
            init_temperature: d.init_temperature,
            evaluate_each_epoch: true,
        })
    }
}
