//! The data-free merges people use (spec §3.10), defined as mergekit 0.1.5 computes them, tensor
//! by tensor: linear, task arithmetic, TIES, DARE (linear and TIES), Model Breadcrumbs (plain and
//! TIES), DELLA (plain and linear), Model Stock, SLERP and NuSLERP.
//!
//! A merge holds one tensor of every input at a time, never a whole model beside another: the
//! output is made tensor by tensor from [`ModelStore::load_tensor`]. Parameters may differ per
//! tensor (mergekit's layer gradients and name filters); the caller resolves them into one
//! [`TensorParams`] per tensor. The element-wise arithmetic follows mergekit's float32 order
//! (differences, weights, sign election, sums in input order), so outputs agree with mergekit's
//! to rounding; norms and dot products are summed in f64.
//!
//! The random sparsifications (DARE, DELLA) draw their masks from a [`MaskSource`]: seeded
//! Bernoulli draws by default, given masks in tests.

use candle_core::{Device, Tensor};

use crate::error::{Result, SoupError};
use crate::layout::{ParamLayout, TensorSpec};
use crate::rng::{derive_seed, SplitMix64};
use crate::traits::ModelStore;
use crate::transfer;

/// A data-free merge method, named as in mergekit's `merge_method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFreeMethod {
    /// Σ w_i θ_i, divided by Σ w_i unless `normalize: false` (Wortsman et al. 2022).
    Linear,
    /// θ_0 + λ Σ w_k (θ_k − θ_0) (Ilharco et al. 2023).
    TaskArithmetic,
    /// Trim each task vector to its largest `density` per tensor, elect signs, disjoint mean
    /// (Yadav et al. 2023).
    Ties,
    /// Drop each task vector's entries with probability 1 − `density`, rescale, add (Yu et al. 2024).
    DareLinear,
    /// DARE's drop, then TIES' sign election and disjoint mean.
    DareTies,
    /// Drop each task vector's smallest and largest (`gamma`) entries, add (Davari & Belilovsky 2024).
    Breadcrumbs,
    /// Breadcrumbs' drop, then TIES' sign election and disjoint mean.
    BreadcrumbsTies,
    /// DARE with drop probabilities ranked by magnitude (`epsilon`), sign election (Deep et al. 2024).
    Della,
    /// DELLA's drop without sign election.
    DellaLinear,
    /// θ_0 moved toward the mean by the angle between task vectors (Jang et al. 2024).
    ModelStock,
    /// Spherical interpolation from the base to one other model by `t`.
    Slerp,
    /// Spherical interpolation of two models (or their task vectors) by their weights.
    Nuslerp,
}

/// How a method treats `base_model`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseRule {
    /// The base is one more input, like any other (linear).
    Input,
    /// The method needs a base: the task vectors are differences from it.
    Required,
    /// Task vectors from the base when there is one, the models themselves when not (NuSLERP).
    Optional,
}

/// Which inputs a parameter is given for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One value for the whole merge (of each tensor).
    Shared,
    /// A value for every input, the base included.
    EveryInput,
    /// A value for every input but the base.
    NonBase,
}

/// One parameter of a method: mergekit's name, where it applies and its default (`None`: required).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ParamInfo {
    /// mergekit's name.
    pub name: &'static str,
    /// Where it applies.
    pub scope: Scope,
    /// Whether it is true/false (else a number).
    pub boolean: bool,
    /// The default (1/0 for booleans); `None` when it must be given.
    pub default: Option<f64>,
}

const fn shared_bool(name: &'static str, default: bool) -> ParamInfo {
    ParamInfo {
        name,
        scope: Scope::Shared,
        boolean: true,
        default: Some(if default { 1.0 } else { 0.0 }),
    }
}

const fn number(name: &'static str, scope: Scope, default: Option<f64>) -> ParamInfo {
    ParamInfo {
        name,
        scope,
        boolean: false,
        default,
    }
}

/// How a task-arithmetic family method sparsifies each task vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sparsify {
    Magnitude,
    Random,
    MagnitudeOutliers,
    DellaMagprune,
}

/// A method of mergekit's generalized task arithmetic: its sparsification, whether it elects
/// signs, and its defaults of `normalize` and `rescale`.
struct Gta {
    sparsify: Option<Sparsify>,
    consensus: bool,
    normalize: bool,
    rescale: bool,
}

impl DataFreeMethod {
    /// Every method, in the order `--help` lists them.
    pub const ALL: [DataFreeMethod; 12] = [
        DataFreeMethod::Linear,
        DataFreeMethod::TaskArithmetic,
        DataFreeMethod::Ties,
        DataFreeMethod::DareLinear,
        DataFreeMethod::DareTies,
        DataFreeMethod::Breadcrumbs,
        DataFreeMethod::BreadcrumbsTies,
        DataFreeMethod::Della,
        DataFreeMethod::DellaLinear,
        DataFreeMethod::ModelStock,
        DataFreeMethod::Slerp,
        DataFreeMethod::Nuslerp,
    ];

    /// mergekit's name (`merge_method`).
    pub fn name(self) -> &'static str {
        match self {
            DataFreeMethod::Linear => "linear",
            DataFreeMethod::TaskArithmetic => "task_arithmetic",
            DataFreeMethod::Ties => "ties",
            DataFreeMethod::DareLinear => "dare_linear",
            DataFreeMethod::DareTies => "dare_ties",
            DataFreeMethod::Breadcrumbs => "breadcrumbs",
            DataFreeMethod::BreadcrumbsTies => "breadcrumbs_ties",
            DataFreeMethod::Della => "della",
            DataFreeMethod::DellaLinear => "della_linear",
            DataFreeMethod::ModelStock => "model_stock",
            DataFreeMethod::Slerp => "slerp",
            DataFreeMethod::Nuslerp => "nuslerp",
        }
    }

    /// The method of mergekit's name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// One line on what the method does.
    pub fn summary(self) -> &'static str {
        match self {
            DataFreeMethod::Linear => "weighted average of the models",
            DataFreeMethod::TaskArithmetic => "base + λ · weighted sum of task vectors",
            DataFreeMethod::Ties => "trim task vectors by magnitude, elect signs, disjoint mean",
            DataFreeMethod::DareLinear => "drop task-vector entries at random, rescale, add",
            DataFreeMethod::DareTies => "DARE's random drop with TIES' sign election",
            DataFreeMethod::Breadcrumbs => "drop the smallest and the largest entries, add",
            DataFreeMethod::BreadcrumbsTies => "breadcrumbs' drop with TIES' sign election",
            DataFreeMethod::Della => "drop at random, small entries likelier, elect signs",
            DataFreeMethod::DellaLinear => "DELLA's drop without sign election",
            DataFreeMethod::ModelStock => {
                "move the base toward the mean by the task vectors' angle"
            }
            DataFreeMethod::Slerp => "spherical interpolation of the base and one model by t",
            DataFreeMethod::Nuslerp => "spherical interpolation of two models by their weights",
        }
    }

    /// How the method treats `base_model`.
    pub fn base_rule(self) -> BaseRule {
        match self {
            DataFreeMethod::Linear => BaseRule::Input,
            DataFreeMethod::Nuslerp => BaseRule::Optional,
            _ => BaseRule::Required,
        }
    }

    /// The fewest and the most inputs other than the base (`None`: no limit).
    pub fn non_base_inputs(self) -> (usize, Option<usize>) {
        match self {
            DataFreeMethod::Slerp => (1, Some(1)),
            DataFreeMethod::Nuslerp => (2, Some(2)),
            DataFreeMethod::ModelStock => (2, None),
            _ => (1, None),
        }
    }

    /// Whether the method draws random masks (DARE, DELLA).
    pub fn is_random(self) -> bool {
        matches!(
            self.gta().and_then(|g| g.sparsify),
            Some(Sparsify::Random | Sparsify::DellaMagprune)
        )
    }

    fn gta(self) -> Option<Gta> {
        let (sparsify, consensus, normalize, rescale) = match self {
            DataFreeMethod::TaskArithmetic => (None, false, false, false),
            DataFreeMethod::Ties => (Some(Sparsify::Magnitude), true, true, false),
            DataFreeMethod::DareTies => (Some(Sparsify::Random), true, false, true),
            DataFreeMethod::DareLinear => (Some(Sparsify::Random), false, false, true),
            DataFreeMethod::Breadcrumbs => (Some(Sparsify::MagnitudeOutliers), false, false, false),
            DataFreeMethod::BreadcrumbsTies => {
                (Some(Sparsify::MagnitudeOutliers), true, false, false)
            }
            DataFreeMethod::Della => (Some(Sparsify::DellaMagprune), true, true, true),
            DataFreeMethod::DellaLinear => (Some(Sparsify::DellaMagprune), false, false, true),
            _ => return None,
        };
        Some(Gta {
            sparsify,
            consensus,
            normalize,
            rescale,
        })
    }

    /// The method's parameters with mergekit's names, scopes and defaults.
    pub fn parameters(self) -> Vec<ParamInfo> {
        match self {
            DataFreeMethod::Linear => vec![
                number("weight", Scope::EveryInput, None),
                shared_bool("normalize", true),
            ],
            DataFreeMethod::ModelStock => vec![shared_bool("filter_wise", false)],
            DataFreeMethod::Slerp => vec![number("t", Scope::Shared, None)],
            DataFreeMethod::Nuslerp => vec![
                number("weight", Scope::NonBase, None),
                shared_bool("nuslerp_row_wise", false),
                shared_bool("nuslerp_flatten", true),
            ],
            _ => {
                let g = self
                    .gta()
                    .expect("the other methods are task arithmetic's family");
                let mut p = vec![
                    shared_bool("int8_mask", false),
                    shared_bool("normalize", g.normalize),
                    shared_bool("rescale", g.rescale),
                    number("lambda", Scope::Shared, Some(1.0)),
                    number("weight", Scope::NonBase, None),
                    number("density", Scope::NonBase, Some(1.0)),
                ];
                match g.sparsify {
                    Some(Sparsify::MagnitudeOutliers) => {
                        p.push(number("gamma", Scope::NonBase, Some(0.01)))
                    }
                    Some(Sparsify::DellaMagprune) => {
                        p.push(number("epsilon", Scope::NonBase, Some(0.15)))
                    }
                    _ => {}
                }
                p
            }
        }
    }
}

/// The parameters of one input of one tensor's merge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InputParams {
    /// `weight`.
    pub weight: f64,
    /// `density`: the fraction of the task vector kept.
    pub density: f64,
    /// `gamma`: breadcrumbs' fraction of largest entries dropped.
    pub gamma: f64,
    /// `epsilon`: DELLA's spread of keep probabilities around `density`.
    pub epsilon: f64,
}

/// The shared parameters of one tensor's merge.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SharedParams {
    /// Divide by the sum of the weights.
    pub normalize: bool,
    /// Rescale a sparsified task vector to its L1 norm before the drop.
    pub rescale: bool,
    /// Scale of the merged task vector.
    pub lambda: f64,
    /// SLERP's interpolation factor.
    pub t: f64,
    /// Model Stock: one angle per row rather than per tensor.
    pub filter_wise: bool,
    /// NuSLERP: interpolate the columns rather than the rows.
    pub nuslerp_row_wise: bool,
    /// NuSLERP: interpolate the whole tensor as one vector.
    pub nuslerp_flatten: bool,
    /// The precision of the task-arithmetic family's arithmetic (mergekit's `dtype`).
    pub arithmetic: Arithmetic,
}

/// The precision mergekit's task-arithmetic family computes in: its `dtype`. Each step is made
/// in f32 and rounded to it, which is exact IEEE half-precision arithmetic (f32 carries more
/// than twice the bits, so the double rounding is harmless); reductions add in f32 and round
/// once, as torch's do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Arithmetic {
    /// Single precision.
    #[default]
    F32,
    /// IEEE half precision (`float16`).
    F16,
    /// bfloat16.
    Bf16,
}

impl Arithmetic {
    /// `x` rounded to this precision.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Arithmetic::F32 => x,
            Arithmetic::F16 => half::f16::from_f32(x).to_f32(),
            Arithmetic::Bf16 => half::bf16::from_f32(x).to_f32(),
        }
    }
}

/// Every parameter of one tensor's merge: the shared ones and one set per input (in the
/// store's order; the base's entry is ignored where the scope is [`Scope::NonBase`]).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorParams {
    /// The shared parameters.
    pub shared: SharedParams,
    /// One per input.
    pub inputs: Vec<InputParams>,
}

impl TensorParams {
    /// The defaults of `method` for `inputs` inputs (required parameters are 0 until set).
    pub fn defaults(method: DataFreeMethod, inputs: usize) -> Self {
        let mut p = TensorParams {
            shared: SharedParams {
                normalize: false,
                rescale: false,
                lambda: 1.0,
                t: 0.0,
                filter_wise: false,
                nuslerp_row_wise: false,
                nuslerp_flatten: true,
                arithmetic: Arithmetic::F32,
            },
            inputs: vec![
                InputParams {
                    weight: 0.0,
                    density: 1.0,
                    gamma: 0.01,
                    epsilon: 0.15,
                };
                inputs
            ],
        };
        for info in method.parameters() {
            if let Some(v) = info.default {
                match info.scope {
                    Scope::Shared => p.set_shared(info.name, v),
                    _ => (0..inputs).for_each(|i| p.set_input(i, info.name, v)),
                }
            }
        }
        p
    }

    /// Sets shared parameter `name` (booleans as 1/0); unknown names are ignored.
    pub fn set_shared(&mut self, name: &str, value: f64) {
        let s = &mut self.shared;
        match name {
            "normalize" => s.normalize = value != 0.0,
            "rescale" => s.rescale = value != 0.0,
            "lambda" => s.lambda = value,
            "t" => s.t = value,
            "filter_wise" => s.filter_wise = value != 0.0,
            "nuslerp_row_wise" => s.nuslerp_row_wise = value != 0.0,
            "nuslerp_flatten" => s.nuslerp_flatten = value != 0.0,
            _ => {}
        }
    }

    /// Sets parameter `name` of input `i`; unknown names are ignored.
    pub fn set_input(&mut self, i: usize, name: &str, value: f64) {
        let p = &mut self.inputs[i];
        match name {
            "weight" => p.weight = value,
            "density" => p.density = value,
            "gamma" => p.gamma = value,
            "epsilon" => p.epsilon = value,
            _ => {}
        }
    }
}

/// The probability of keeping each entry of a task vector.
#[derive(Clone, Copy, Debug)]
pub enum KeepProbability<'a> {
    /// The same for every entry (DARE).
    Uniform(f64),
    /// One per entry (DELLA).
    PerEntry(&'a [f64]),
}

/// Where the random sparsifications' masks come from.
pub trait MaskSource {
    /// The mask (true: kept) of the `n` entries of input `input`'s task vector at tensor `tensor`.
    fn mask(
        &mut self,
        tensor: usize,
        input: usize,
        n: usize,
        keep: KeepProbability<'_>,
    ) -> Result<Vec<bool>>;
}

/// Bernoulli masks drawn with SplitMix64 from a seed, the tensor's index and the input's: the
/// same seed gives the same merge, whatever order tensors are merged in.
#[derive(Clone, Copy, Debug)]
pub struct SeededMasks {
    /// The seed of every draw.
    pub seed: u64,
}

impl MaskSource for SeededMasks {
    fn mask(
        &mut self,
        tensor: usize,
        input: usize,
        n: usize,
        keep: KeepProbability<'_>,
    ) -> Result<Vec<bool>> {
        let mut rng = SplitMix64::new(derive_seed(self.seed, &[tensor as u64, input as u64]));
        Ok((0..n)
            .map(|i| {
                let p = match keep {
                    KeepProbability::Uniform(p) => p,
                    KeepProbability::PerEntry(p) => p[i],
                };
                rng.next_f64() < p
            })
            .collect())
    }
}

/// An error about one tensor's merge.
fn invalid(tensor: &str, reason: impl Into<String>) -> SoupError {
    SoupError::Merge {
        tensor: tensor.to_string(),
        reason: reason.into(),
    }
}

/// Checks `params` before any tensor is read: densities in (0, 1], γ in [0, 1), DELLA's
/// density ± ε in (0, 1), and weights that can be normalised.
pub fn check_params(
    method: DataFreeMethod,
    tensor: &str,
    base: Option<usize>,
    params: &TensorParams,
) -> Result<()> {
    let non_base = |i: &usize| Some(*i) != base;
    let gta = method.gta();
    for (i, p) in params.inputs.iter().enumerate() {
        let finite = [p.weight, p.density, p.gamma, p.epsilon];
        if finite.iter().any(|v| !v.is_finite()) {
            return Err(invalid(
                tensor,
                format!("input {i} has a non-finite parameter"),
            ));
        }
        if !non_base(&i) {
            continue;
        }
        if let Some(g) = &gta {
            if !(p.density > 0.0 && p.density <= 1.0) {
                return Err(invalid(
                    tensor,
                    format!("density {} of input {i} is outside (0, 1]", p.density),
                ));
            }
            if g.sparsify == Some(Sparsify::MagnitudeOutliers) && !(0.0..1.0).contains(&p.gamma) {
                return Err(invalid(
                    tensor,
                    format!("gamma {} of input {i} is outside [0, 1)", p.gamma),
                ));
            }
            if g.sparsify == Some(Sparsify::DellaMagprune)
                && p.density < 1.0
                && !(p.density - p.epsilon > 0.0 && p.density + p.epsilon < 1.0)
            {
                return Err(invalid(
                    tensor,
                    format!(
                        "density {} ± epsilon {} of input {i} leaves (0, 1)",
                        p.density, p.epsilon
                    ),
                ));
            }
        }
    }
    let s = &params.shared;
    if !s.lambda.is_finite() || !s.t.is_finite() {
        return Err(invalid(tensor, "lambda or t is not finite"));
    }
    let sum = |skip_base: bool| -> f64 {
        params
            .inputs
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip_base || non_base(i))
            .map(|(_, p)| p.weight)
            .sum()
    };
    let unnormalisable = match method {
        DataFreeMethod::Linear => s.normalize && sum(false).abs() < 1e-8,
        _ => matches!(&gta, Some(g) if !g.consensus) && s.normalize && sum(true).abs() < 1e-8,
    };
    if unnormalisable {
        return Err(invalid(
            tensor,
            "the weights sum to zero and normalize is true (set normalize: false or change a weight)",
        ));
    }
    Ok(())
}

/// Merges one tensor of every input. `inputs[i]` holds input i's values (all of one shape);
/// `base` is the base's index in `inputs`, when the method has one.
pub fn merge_tensor(
    method: DataFreeMethod,
    (index, name, shape): (usize, &str, &[usize]),
    inputs: &[&[f32]],
    base: Option<usize>,
    params: &TensorParams,
    masks: &mut dyn MaskSource,
) -> Result<Vec<f32>> {
    let n = shape.iter().product::<usize>();
    if let Some(i) = inputs.iter().position(|x| x.len() != n) {
        return Err(invalid(
            name,
            format!("input {i} has the wrong number of values"),
        ));
    }
    if params.inputs.len() != inputs.len() {
        return Err(invalid(name, "one parameter set per input is needed"));
    }
    check_params(method, name, base, params)?;
    let others: Vec<usize> = (0..inputs.len()).filter(|&i| Some(i) != base).collect();
    let (least, most) = method.non_base_inputs();
    if others.len() < least || most.is_some_and(|m| others.len() > m) {
        return Err(invalid(
            name,
            format!(
                "{} takes {} inputs besides the base, not {}",
                method.name(),
                match most {
                    Some(m) if m == least => format!("exactly {m}"),
                    _ => format!("at least {least}"),
                },
                others.len()
            ),
        ));
    }
    let need_base =
        || base.ok_or_else(|| invalid(name, format!("{} needs a base_model", method.name())));
    Ok(match method {
        DataFreeMethod::Linear => linear(inputs, params),
        DataFreeMethod::ModelStock => {
            let b = need_base()?;
            let ws: Vec<&[f32]> = others.iter().map(|&i| inputs[i]).collect();
            model_stock(inputs[b], &ws, shape, params.shared.filter_wise)
        }
        DataFreeMethod::Slerp => {
            let b = need_base()?;
            slerp(params.shared.t, inputs[b], inputs[others[0]])
        }
        DataFreeMethod::Nuslerp => {
            let (w0, w1) = (
                params.inputs[others[0]].weight,
                params.inputs[others[1]].weight,
            );
            let total = w0 + w1;
            let t = if total.abs() < 1e-6 { 0.5 } else { w1 / total };
            let s = &params.shared;
            let axis = match (s.nuslerp_flatten, s.nuslerp_row_wise) {
                (true, _) => Axis::Whole,
                (false, false) => Axis::Last,
                (false, true) => Axis::First,
            };
            match base {
                Some(b) => {
                    let base = inputs[b];
                    let v0 = sub(inputs[others[0]], base);
                    let v1 = sub(inputs[others[1]], base);
                    let mixed = nuslerp(t, &v0, &v1, shape, axis);
                    base.iter().zip(&mixed).map(|(b, m)| b + m).collect()
                }
                None => nuslerp(t, inputs[others[0]], inputs[others[1]], shape, axis),
            }
        }
        _ => {
            let b = need_base()?;
            let g = method
                .gta()
                .expect("the other methods are task arithmetic's family");
            task_arithmetic_family(&g, (index, shape), inputs, b, &others, params, masks)?
        }
    })
}

/// `a − b`, element by element in f32.
fn sub(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

/// mergekit's `linear`: Σ w_i x_i in f32 in input order, divided by Σ w_i when normalising.
fn linear(inputs: &[&[f32]], params: &TensorParams) -> Vec<f32> {
    let mut out = vec![0f32; inputs[0].len()];
    for (x, p) in inputs.iter().zip(&params.inputs) {
        let w = p.weight as f32;
        out.iter_mut().zip(x.iter()).for_each(|(o, v)| *o += v * w);
    }
    if params.shared.normalize {
        let total: f32 = params.inputs.iter().map(|p| p.weight as f32).sum();
        out.iter_mut().for_each(|o| *o /= total);
    }
    out
}

/// mergekit's generalized task arithmetic: task vectors sparsified, weighted, optionally
/// sign-elected (TIES' "sum" consensus), summed, normalised and scaled by λ, added to the base.
fn task_arithmetic_family(
    g: &Gta,
    (index, shape): (usize, &[usize]),
    inputs: &[&[f32]],
    base: usize,
    others: &[usize],
    params: &TensorParams,
    masks: &mut dyn MaskSource,
) -> Result<Vec<f32>> {
    let theta_0 = inputs[base];
    let n = theta_0.len();
    let r = params.shared.arithmetic;
    let mut deltas: Vec<Vec<f32>> = Vec::with_capacity(others.len());
    for &i in others {
        let p = &params.inputs[i];
        let mut delta: Vec<f32> = sub(inputs[i], theta_0)
            .into_iter()
            .map(|d| r.round(d))
            .collect();
        if let Some(method) = g.sparsify {
            delta = sparsify(
                delta,
                method,
                p,
                (params.shared.rescale, r),
                shape,
                |keep| masks.mask(index, i, n, keep),
            )?;
        }
        let w = r.round(p.weight as f32);
        delta.iter_mut().for_each(|d| *d = r.round(*d * w));
        deltas.push(delta);
    }
    let weights: Vec<f32> = others
        .iter()
        .map(|&i| r.round(params.inputs[i].weight as f32))
        .collect();
    let mut mixed = vec![0f32; n];
    let normalize = params.shared.normalize;
    if g.consensus {
        for e in 0..n {
            let elected = deltas.iter().fold(0f32, |s, d| s + d[e]);
            let majority = if elected >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut divisor) = (0f32, 0f32);
            for (d, w) in deltas.iter().zip(&weights) {
                if sign(d[e]) == majority {
                    sum += d[e];
                    divisor += w;
                }
            }
            let (sum, mut divisor) = (r.round(sum), r.round(divisor));
            if divisor == 0.0 {
                divisor = 1.0;
            }
            mixed[e] = if normalize {
                r.round(sum / divisor)
            } else {
                sum
            };
        }
    } else {
        for d in &deltas {
            mixed.iter_mut().zip(d).for_each(|(m, v)| *m += v);
        }
        mixed.iter_mut().for_each(|m| *m = r.round(*m));
        if normalize {
            let mut divisor: f32 = r.round(weights.iter().sum());
            if divisor.abs() < 1e-8 {
                divisor = 1.0;
            }
            mixed.iter_mut().for_each(|m| *m = r.round(*m / divisor));
        }
    }
    let lambda = params.shared.lambda;
    if lambda != 1.0 {
        let l = lambda as f32;
        mixed.iter_mut().for_each(|m| *m = r.round(*m * l));
    }
    Ok(theta_0
        .iter()
        .zip(&mixed)
        .map(|(b, m)| r.round(b + m))
        .collect())
}

/// torch's `sign`: −1, 0 or 1.
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The indices of the entries of `x` ranked `start .. start + len` by |x| (descending or
/// ascending), ties in index order: the same set as [`by_magnitude`]'s slice, found by two
/// selections in linear time instead of a sort.
fn ranked(x: &[f32], descending: bool, start: usize, len: usize) -> Vec<usize> {
    let n = x.len();
    let end = (start + len).min(n);
    if start >= end {
        return Vec::new();
    }
    // |x| and then the index: a strict order, equal to a stable sort's.
    let order = |a: &usize, b: &usize| {
        let o = x[*a].abs().total_cmp(&x[*b].abs());
        if descending { o.reverse() } else { o }.then(a.cmp(b))
    };
    let mut idx: Vec<usize> = (0..n).collect();
    if start > 0 {
        idx.select_nth_unstable_by(start, order);
    }
    let rest = &mut idx[start..];
    if end - start < rest.len() {
        rest.select_nth_unstable_by(end - start - 1, order);
    }
    rest[..end - start].to_vec()
}

/// Indices of `x` ordered by |x|, ties in index order (a stable sort, as torch's CPU sort is).
fn by_magnitude(x: &[f32], descending: bool) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| {
        let o = x[a].abs().total_cmp(&x[b].abs());
        if descending {
            o.reverse()
        } else {
            o
        }
    });
    order
}

/// mergekit's `sparsify` of one task vector; `draw` gives the mask of a random method.
fn sparsify(
    delta: Vec<f32>,
    method: Sparsify,
    p: &InputParams,
    (rescale, r): (bool, Arithmetic),
    shape: &[usize],
    mut draw: impl FnMut(KeepProbability<'_>) -> Result<Vec<bool>>,
) -> Result<Vec<f32>> {
    let n = delta.len();
    if p.density >= 1.0 || n == 0 {
        return Ok(delta);
    }
    let mut mask = vec![false; n];
    match method {
        Sparsify::Magnitude => {
            // At least one entry survives in a non-empty tensor.
            let k = ((p.density * n as f64) as usize).max(1);
            for i in ranked(&delta, true, 0, k) {
                mask[i] = true;
            }
        }
        Sparsify::MagnitudeOutliers => {
            // Keeps the entries ranked n_bot .. n_bot + target from the smallest: when
            // density · n < 1, none (mergekit zeroes such a tensor).
            let target = (p.density * n as f64) as usize;
            let top = (p.gamma * n as f64) as usize;
            let bottom = n.saturating_sub(target + top);
            for i in ranked(&delta, false, bottom, target) {
                mask[i] = true;
            }
        }
        Sparsify::Random => mask = draw(KeepProbability::Uniform(p.density))?,
        Sparsify::DellaMagprune => {
            let probs = della_probabilities(&delta, shape, p.density, p.epsilon);
            mask = draw(KeepProbability::PerEntry(&probs))?;
        }
    }
    Ok(rescaled_masked(&delta, &mask, rescale, r))
}

/// DELLA's keep probabilities: ranks by magnitude along dimension 1 (a vector is one row),
/// mapped linearly from density − ε (smallest) to density + ε (largest).
fn della_probabilities(delta: &[f32], shape: &[usize], density: f64, epsilon: f64) -> Vec<f64> {
    let n = delta.len();
    let (outer, axis) = match shape.len() {
        0 | 1 => (1, n),
        _ => (shape[0], shape[1]),
    };
    let inner = if axis == 0 || outer == 0 {
        0
    } else {
        n / (outer * axis)
    };
    let mut probs = vec![0f64; n];
    for o in 0..outer {
        for r in 0..inner {
            let at: Vec<usize> = (0..axis).map(|a| (o * axis + a) * inner + r).collect();
            let values: Vec<f32> = at.iter().map(|&i| delta[i]).collect();
            let order = by_magnitude(&values, false);
            for (rank, &k) in order.iter().enumerate() {
                // mergekit divides by (max rank − min rank): 0/0 for a single entry, which
                // leaves the probability NaN there; soup keeps such an entry at density − ε.
                let normed = if axis > 1 {
                    rank as f64 / (axis - 1) as f64
                } else {
                    0.0
                };
                probs[at[k]] = (density - epsilon) + normed * 2.0 * epsilon;
            }
        }
    }
    probs
}

/// `delta · mask`, rescaled to `delta`'s L1 norm when asked (unless either norm is below 1e-7).
fn rescaled_masked(delta: &[f32], mask: &[bool], rescale: bool, r: Arithmetic) -> Vec<f32> {
    let masked: Vec<f32> = delta
        .iter()
        .zip(mask)
        .map(|(&d, &m)| if m { d } else { 0.0 })
        .collect();
    if !rescale {
        return masked;
    }
    let l1 = |x: &[f32]| r.round(x.iter().map(|v| f64::from(v.abs())).sum::<f64>() as f32);
    let (before, after) = (l1(delta), l1(&masked));
    if before < 1e-7 || after < 1e-7 {
        return masked;
    }
    let scale = r.round(before / after);
    masked.into_iter().map(|v| r.round(v * scale)).collect()
}

/// The rows a tensor's reductions run over: `(rows, length)` with rows of contiguous values.
fn rows_of(shape: &[usize], n: usize) -> (usize, usize) {
    match shape.last() {
        Some(&last) if last > 0 && shape.len() > 1 => (n / last, last),
        _ => (1, n),
    }
}

/// mergekit's `model_stock`: t = N cos θ / (1 + (N − 1) cos θ) from the mean pairwise cosine of
/// the task vectors (over the tensor, or per row with `filter_wise`), then
/// t · mean(θ_k) + (1 − t) · θ_0; t = 0 where the denominator vanishes.
fn model_stock(theta_0: &[f32], ws: &[&[f32]], shape: &[usize], filter_wise: bool) -> Vec<f32> {
    let n = theta_0.len();
    let (rows, len) = if filter_wise {
        rows_of(shape, n)
    } else {
        (1, n)
    };
    let offsets: Vec<Vec<f32>> = ws.iter().map(|w| sub(w, theta_0)).collect();
    let count = ws.len();
    let mut average = vec![0f32; n];
    for w in ws {
        average.iter_mut().zip(w.iter()).for_each(|(a, v)| *a += v);
    }
    average.iter_mut().for_each(|a| *a /= count as f32);
    let mut out = vec![0f32; n];
    for r in 0..rows {
        let span = r * len..(r + 1) * len;
        let mut cos_sum = 0f64;
        let mut pairs = 0usize;
        for a in 0..count {
            for b in a + 1..count {
                let (x, y) = (&offsets[a][span.clone()], &offsets[b][span.clone()]);
                let dot: f64 = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| f64::from(*p) * f64::from(*q))
                    .sum();
                let norms = norm(x) * norm(y);
                cos_sum += (dot / norms.max(1e-6)).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
        let cos = cos_sum / pairs as f64;
        let denominator = 1.0 + (count as f64 - 1.0) * cos;
        let t = if denominator.abs() < 1e-6 {
            0.0
        } else {
            (count as f64 * cos / denominator) as f32
        };
        for e in span {
            out[e] = t * average[e] + (1.0 - t) * theta_0[e];
        }
    }
    out
}

/// The L2 norm, summed in f64.
fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|v| f64::from(*v) * f64::from(*v))
        .sum::<f64>()
        .sqrt()
}

/// Σ (a / na)(b / nb), clamped into [−1, 1]: the cosine of `a` and `b` given their norms (each
/// side normalised before the product, as mergekit does, so the raw dot cannot overflow).
fn cosine(a: &[f32], b: &[f32], (na, nb): (f64, f64)) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (f64::from(*x) / na) * (f64::from(*y) / nb))
        .sum::<f64>()
        .clamp(-1.0, 1.0)
}

/// The coefficients of v0 and v1 at `t` for vectors at cosine `cos`: sin((1 − t)θ)/sin θ and
/// sin(tθ)/sin θ, or 1 − t and t where `linear` (the vectors are too close to collinear).
fn spherical(t: f64, cos: f64, linear: bool) -> (f32, f32) {
    if linear {
        return ((1.0 - t) as f32, t as f32);
    }
    let theta = cos.acos();
    let s = theta.sin();
    (
        (((1.0 - t) * theta).sin() / s) as f32,
        ((t * theta).sin() / s) as f32,
    )
}

/// mergekit's `slerp` of a whole tensor: linear where the normalised vectors are within
/// 0.9995 of (anti)parallel, spherical otherwise; norms at most 1e-8 count as 1.
fn slerp(t: f64, v0: &[f32], v1: &[f32]) -> Vec<f32> {
    let guard = |n: f64| if n > 1e-8 { n } else { 1.0 };
    let dot = cosine(v0, v1, (guard(norm(v0)), guard(norm(v1))));
    let (ca, cb) = spherical(t, dot, dot.abs() > 0.9995);
    v0.iter().zip(v1).map(|(a, b)| ca * a + cb * b).collect()
}

/// The vectors NuSLERP interpolates: the whole tensor, each row (last dimension) or each
/// column (first dimension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Axis {
    Whole,
    Last,
    First,
}

/// mergekit's `nuslerp`: per vector, (sin((1 − t)θ) v0 + sin(tθ) v1) / sin θ with θ the angle
/// between v0 and v1, linear where they are collinear.
fn nuslerp(t: f64, v0: &[f32], v1: &[f32], shape: &[usize], axis: Axis) -> Vec<f32> {
    let n = v0.len();
    // Each vector as the indices of its entries.
    let vectors: Vec<Vec<usize>> = match axis {
        Axis::Whole => vec![(0..n).collect()],
        Axis::Last => {
            let (rows, len) = rows_of(shape, n);
            (0..rows)
                .map(|r| (r * len..(r + 1) * len).collect())
                .collect()
        }
        Axis::First => {
            let first = shape.first().copied().unwrap_or(n).max(1);
            let rest = n / first;
            (0..rest)
                .map(|c| (0..first).map(|r| r * rest + c).collect())
                .collect()
        }
    };
    let mut out = vec![0f32; n];
    for at in vectors {
        let x: Vec<f32> = at.iter().map(|&i| v0[i]).collect();
        let y: Vec<f32> = at.iter().map(|&i| v1[i]).collect();
        let cos = cosine(&x, &y, (norm(&x).max(1e-7), norm(&y).max(1e-7)));
        let (ca, cb) = spherical(t, cos, 1.0 - cos * cos <= 1e-16);
        for (k, &i) in at.iter().enumerate() {
            out[i] = ca * x[k] + cb * y[k];
        }
    }
    out
}

/// Merges every tensor of `store`'s models with `method`, one tensor of every model in memory
/// at a time. `params(k, spec)` gives tensor k's parameters; `base` is the base's index in the
/// store. Returns the merged tensors in layout order, as f32 on the store's device.
pub fn data_free_merge(
    store: &dyn ModelStore,
    method: DataFreeMethod,
    base: Option<usize>,
    params: &mut dyn FnMut(usize, &TensorSpec) -> Result<TensorParams>,
    masks: &mut dyn MaskSource,
) -> Result<Vec<Tensor>> {
    if store.is_empty() {
        return Err(SoupError::EmptyZoo);
    }
    let layout: ParamLayout = store.layout(0)?;
    for i in 1..store.len() {
        layout.check_same(&store.name(i), &store.layout(i)?)?;
    }
    // Every tensor's parameters are checked before the first is read.
    let all: Vec<TensorParams> = layout
        .tensors
        .iter()
        .enumerate()
        .map(|(k, spec)| {
            let p = params(k, spec)?;
            check_params(method, &spec.name, base, &p)?;
            Ok(p)
        })
        .collect::<Result<_>>()?;
    let device: Device = store.device();
    let mut out = Vec::with_capacity(layout.len());
    for (k, (spec, p)) in layout.tensors.iter().zip(&all).enumerate() {
        let values: Vec<Vec<f32>> = (0..store.len())
            .map(|i| {
                let t = store.load_tensor(i, k)?;
                transfer::to_vec_of::<f32>(&t.flatten_all()?.to_dtype(candle_core::DType::F32)?)
            })
            .collect::<Result<_>>()?;
        let views: Vec<&[f32]> = values.iter().map(Vec::as_slice).collect();
        let merged = merge_tensor(method, (k, &spec.name, &spec.shape), &views, base, p, masks)?;
        out.push(transfer::upload_vec(
            merged,
            spec.shape.as_slice(),
            &device,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_lists_every_method_with_its_models_held() {
        let readme = include_str!("../../README.md");
        let table = &readme[readme.find("| `merge_method` |").expect("the table")..];
        for m in DataFreeMethod::ALL {
            let row = table
                .lines()
                .find(|l| l.starts_with('|') && l.contains(&format!("`{}`", m.name())))
                .unwrap_or_else(|| panic!("README.md lacks a row for {}", m.name()));
            assert!(
                row.contains("| none | 1 model + 1 tensor per input |"),
                "{row}"
            );
        }
    }

    #[test]
    fn ranked_selects_the_slice_of_the_stable_sort_ties_included() {
        let mut rng = SplitMix64::new(5);
        for case in 0..200 {
            let n = 1 + rng.below(60);
            // Few distinct magnitudes of both signs: many ties.
            let x: Vec<f32> = (0..n).map(|_| (rng.below(7) as f32 - 3.0) * 0.5).collect();
            for descending in [true, false] {
                let order = by_magnitude(&x, descending);
                let start = rng.below(n + 1);
                let len = rng.below(n + 1);
                let mut got = ranked(&x, descending, start, len);
                got.sort_unstable();
                let mut want: Vec<usize> = order.iter().skip(start).take(len).copied().collect();
                want.sort_unstable();
                assert_eq!(got, want, "case {case}: {x:?} {descending} {start} {len}");
            }
        }
    }

    #[test]
    fn names_parse_back_and_required_parameters_have_no_default() {
        for m in DataFreeMethod::ALL {
            assert_eq!(DataFreeMethod::from_name(m.name()), Some(m));
            let p = m.parameters();
            let required: Vec<&str> = p
                .iter()
                .filter(|i| i.default.is_none())
                .map(|i| i.name)
                .collect();
            let expected: &[&str] = match m {
                DataFreeMethod::ModelStock => &[],
                DataFreeMethod::Slerp => &["t"],
                _ => &["weight"],
            };
            assert_eq!(required, expected, "{}", m.name());
        }
        assert_eq!(DataFreeMethod::from_name("ranked_ties"), None);
    }
}
