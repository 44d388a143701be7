//! The soup methods by their paper names: what each is called, which configuration it starts
//! from, and how much tensor memory it holds (spec §4 and §3.5), in one place.

use crate::baselines::LearnedConfig;
use crate::layout::BlockCut;
use crate::mehl::MehlConfig;

/// A way to make a soup of N models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Method {
    /// The mean of the models (Wortsman et al.).
    #[cfg_attr(feature = "serde", serde(rename = "uniform"))]
    Uniform,
    /// Models added in order of held-out accuracy while it improves (Wortsman et al.).
    #[cfg_attr(feature = "serde", serde(rename = "greedy"))]
    Greedy,
    /// One coefficient per model, learned with every model in memory.
    #[cfg_attr(feature = "serde", serde(rename = "learned"))]
    Learned,
    /// Learned, one coefficient per model and block.
    #[cfg_attr(feature = "serde", serde(rename = "learned+"))]
    LearnedPlus,
    /// MEHL-Soup: Learned on a hyperplane, model batch by model batch.
    #[cfg_attr(feature = "serde", serde(rename = "mehl"))]
    Mehl,
    /// MEHL-Soup+: MEHL-Soup with one coefficient per model and block.
    #[cfg_attr(feature = "serde", serde(rename = "mehl+"))]
    MehlPlus,
    /// Multi-task merging (spec §3.9): θ_0 + Σ_k λ_k τ_k with one λ per task model, learned by
    /// entropy minimisation on unlabelled inputs (AdaMerging, Yang et al., ICLR 2024), through
    /// MEHL's model batches.
    #[cfg_attr(feature = "serde", serde(rename = "adamerging"))]
    AdaMerging,
    /// Layer-wise AdaMerging: one λ per task model and tensor.
    #[cfg_attr(feature = "serde", serde(rename = "adamerging+"))]
    AdaMergingPlus,
    /// θ_0 + λ Σ_k τ_k, λ chosen on held-out data (Ilharco et al., ICLR 2023).
    #[cfg_attr(feature = "serde", serde(rename = "task-arithmetic"))]
    TaskArithmetic,
    /// TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint mean; λ chosen on
    /// held-out data.
    #[cfg_attr(feature = "serde", serde(rename = "ties"))]
    Ties,
}

impl Method {
    /// Every method, in the order of the paper's tables.
    pub const ALL: [Method; 10] = [
        Method::Uniform,
        Method::Greedy,
        Method::Learned,
        Method::LearnedPlus,
        Method::Mehl,
        Method::MehlPlus,
        Method::AdaMerging,
        Method::AdaMergingPlus,
        Method::TaskArithmetic,
        Method::Ties,
    ];

    /// The names the methods go by on the command line and in recipes, in [`Method::ALL`] order.
    pub const NAMES: [&'static str; 10] = [
        "uniform",
        "greedy",
        "learned",
        "learned+",
        "mehl",
        "mehl+",
        "adamerging",
        "adamerging+",
        "task-arithmetic",
        "ties",
    ];

    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|&m| m == self).unwrap_or(0)]
    }

    /// Learned-Soup or Learned-Soup+.
    pub fn is_learned(self) -> bool {
        matches!(self, Method::Learned | Method::LearnedPlus)
    }

    /// MEHL-Soup or MEHL-Soup+.
    pub fn is_mehl(self) -> bool {
        matches!(self, Method::Mehl | Method::MehlPlus)
    }

    /// AdaMerging or AdaMerging+ (MEHL's driver on task vectors).
    pub fn is_adamerging(self) -> bool {
        matches!(self, Method::AdaMerging | Method::AdaMergingPlus)
    }

    /// A multi-task merge of models fine-tuned from one base on different tasks (spec §3.9):
    /// the zoo has a base, and each task model keeps its own head.
    pub fn is_multitask(self) -> bool {
        matches!(
            self,
            Method::AdaMerging | Method::AdaMergingPlus | Method::TaskArithmetic | Method::Ties
        )
    }

    /// Whether the method runs over several processes (the others hold or search every model
    /// in one).
    pub fn runs_distributed(self) -> bool {
        matches!(self, Method::Uniform | Method::Mehl | Method::MehlPlus)
    }

    /// The block cut by default: one coefficient per model (whole) for Learned and MEHL, one per
    /// model and tensor for their + variants.
    pub fn default_block_cut(self) -> BlockCut {
        match self {
            Method::Mehl | Method::Learned | Method::AdaMerging => BlockCut::WHOLE,
            Method::TaskArithmetic | Method::Ties => BlockCut::WHOLE,
            _ => BlockCut::PER_TENSOR,
        }
    }

    /// The authors' MEHL-Soup+ run: the defaults of both MEHL methods' other knobs.
    pub fn mehl_defaults() -> MehlConfig {
        MehlConfig::mehl_plus()
    }

    /// model-soups' Learned-Soup run: the defaults of both Learned methods' other knobs.
    pub fn learned_defaults() -> LearnedConfig {
        LearnedConfig::learned()
    }

    /// The tensor memory the method holds for N models of `d` f32 parameters with model batch
    /// `b` (the byte account of `MemoryAccount`, before the model's activations and the data):
    /// uniform a running sum and a model, greedy also the best soup, Learned all N models plus
    /// the soup and its gradient, MEHL b directions plus center, θ, ∇θ and one loaded model
    /// (AdaMerging the same: θ_0 is resident only while a batch's task vectors are made, in
    /// place of θ and ∇θ), task arithmetic θ_0, one model, the sum and τ, TIES those in f64 on
    /// the host plus the elected signs and counts (11 f32 models).
    pub fn tensor_bytes(self, n: usize, d: usize, b: usize) -> u64 {
        self.tensor_bytes_with(n, d, b, 4)
    }

    /// [`Self::tensor_bytes`] with MEHL's directions stored in `direction_elem_bytes` bytes per
    /// element (2 for bf16/f16).
    pub fn tensor_bytes_with(self, n: usize, d: usize, b: usize, direction_elem_bytes: u64) -> u64 {
        let model = 4 * d as u64;
        match self {
            Method::Uniform => 2 * model,
            Method::Greedy => 3 * model,
            Method::Learned | Method::LearnedPlus => (n as u64 + 2) * model,
            Method::Mehl | Method::MehlPlus => {
                b.min(n) as u64 * direction_elem_bytes * d as u64 + 4 * model
            }
            Method::AdaMerging | Method::AdaMergingPlus => {
                b.min(n.saturating_sub(1)) as u64 * direction_elem_bytes * d as u64 + 4 * model
            }
            Method::TaskArithmetic => 4 * model,
            Method::Ties => 11 * model,
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::NAMES
            .iter()
            .position(|&n| n == s)
            .map(|i| Self::ALL[i])
            .ok_or_else(|| format!("unknown method {s:?} (known: {})", Self::NAMES.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_defaults_follow_the_paper() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
        }
        assert!("stew".parse::<Method>().unwrap_err().contains("mehl+"));
        assert_eq!(Method::Mehl.default_block_cut(), BlockCut::WHOLE);
        assert_eq!(Method::MehlPlus.default_block_cut(), BlockCut::PER_TENSOR);
        assert_eq!(
            Method::LearnedPlus.default_block_cut(),
            BlockCut::PER_TENSOR
        );
        // MEHL's memory grows with b, not N; Learned's with N.
        let d = 1000;
        assert_eq!(
            Method::MehlPlus.tensor_bytes(72, d, 8),
            Method::MehlPlus.tensor_bytes(8, d, 8)
        );
        assert_eq!(Method::Learned.tensor_bytes(72, d, 8), 74 * 4000);
        assert_eq!(Method::MehlPlus.tensor_bytes(72, d, 8), 12 * 4000);
        assert_eq!(Method::MehlPlus.tensor_bytes(3, d, 8), 7 * 4000);
        // bf16 directions: 8 directions of 2 bytes per parameter, 4 f32 models.
        assert_eq!(
            Method::MehlPlus.tensor_bytes_with(72, d, 8, 2),
            8 * 2000 + 4 * 4000
        );
        assert_eq!(Method::Learned.tensor_bytes_with(72, d, 8, 2), 74 * 4000);
    }
}
