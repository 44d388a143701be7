//! The soup methods by their paper names: what each is called, which configuration it starts
//! from, and how much tensor memory it holds (spec §4 and §3.5), in one place. [`REGISTRY`] is
//! the table every front end reads (`soup mix --help`, recipes, `soup inspect`, the README's
//! methods table): adding a method is a variant here, a registry line, and its run.

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

/// What a method reads besides the models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataUse {
    /// Held-out examples (labelled images, or text for a language model): the soup is chosen or
    /// learned on them.
    Heldout,
    /// Each task's inputs without their labels (the entropy of the merged model's predictions),
    /// and its held-out labels to report the merge.
    Unlabelled,
    /// Held-out examples only to choose one scalar λ from a short list.
    Lambda,
}

impl DataUse {
    /// In words, as the README's methods table says it.
    pub fn describe(self) -> &'static str {
        match self {
            DataUse::Heldout => "held-out: labelled, or text",
            DataUse::Unlabelled => "unlabelled task inputs",
            DataUse::Lambda => "held-out, to choose λ",
        }
    }
}

/// One line of [`REGISTRY`]: a method, its name, and what it is.
#[derive(Clone, Copy, Debug)]
pub struct MethodInfo {
    /// The method.
    pub method: Method,
    /// Its name on the command line, in recipes and reports.
    pub name: &'static str,
    /// One line for `--help`.
    pub summary: &'static str,
    /// The paper it comes from.
    pub paper: &'static str,
    /// What it reads besides the models.
    pub data: DataUse,
    /// The models' worth of tensors it holds at once, for N models and model batch b (the
    /// formula of [`Method::tensor_bytes`], in words).
    pub holds: &'static str,
}

/// Every method, in the order of the paper's tables.
pub const REGISTRY: [MethodInfo; 10] = [
    MethodInfo {
        method: Method::Uniform,
        name: "uniform",
        summary: "the mean of the models",
        paper: "Wortsman et al., ICML 2022 (model soups)",
        data: DataUse::Heldout,
        holds: "2 models",
    },
    MethodInfo {
        method: Method::Greedy,
        name: "greedy",
        summary: "models added in order of held-out score while the soup improves",
        paper: "Wortsman et al., ICML 2022 (model soups)",
        data: DataUse::Heldout,
        holds: "3 models",
    },
    MethodInfo {
        method: Method::Learned,
        name: "learned",
        summary: "one coefficient per model, learned on held-out data with every model in memory",
        paper: "Wortsman et al., ICML 2022 (model soups)",
        data: DataUse::Heldout,
        holds: "N + 2 models",
    },
    MethodInfo {
        method: Method::LearnedPlus,
        name: "learned+",
        summary: "learned, with one coefficient per model and block",
        paper: "Wortsman et al., ICML 2022 (model soups)",
        data: DataUse::Heldout,
        holds: "N + 2 models",
    },
    MethodInfo {
        method: Method::Mehl,
        name: "mehl",
        summary: "learned on a hyperplane, model batch by model batch (memory grows with b, not N)",
        paper: "Li et al., ECCV 2024 (MEHL-Soup)",
        data: DataUse::Heldout,
        holds: "b directions + 4 models",
    },
    MethodInfo {
        method: Method::MehlPlus,
        name: "mehl+",
        summary: "mehl, with one coefficient per model and block",
        paper: "Li et al., ECCV 2024 (MEHL-Soup)",
        data: DataUse::Heldout,
        holds: "b directions + 4 models",
    },
    MethodInfo {
        method: Method::AdaMerging,
        name: "adamerging",
        summary: "θ_0 + Σ λ_k τ_k, one λ per task model, learned by entropy minimisation",
        paper: "Yang et al., ICLR 2024 (AdaMerging)",
        data: DataUse::Unlabelled,
        holds: "b task vectors + 4 models",
    },
    MethodInfo {
        method: Method::AdaMergingPlus,
        name: "adamerging+",
        summary: "adamerging, with one λ per task model and tensor",
        paper: "Yang et al., ICLR 2024 (AdaMerging)",
        data: DataUse::Unlabelled,
        holds: "b task vectors + 4 models",
    },
    MethodInfo {
        method: Method::TaskArithmetic,
        name: "task-arithmetic",
        summary: "θ_0 + λ Σ_k τ_k, λ chosen on held-out data",
        paper: "Ilharco et al., ICLR 2023 (task arithmetic)",
        data: DataUse::Lambda,
        holds: "4 models",
    },
    MethodInfo {
        method: Method::Ties,
        name: "ties",
        summary: "trim each task vector, elect signs, disjoint mean; λ chosen on held-out data",
        paper: "Yadav et al., NeurIPS 2023 (TIES-Merging)",
        data: DataUse::Lambda,
        holds: "11 models",
    },
];

/// The single-task soups: N models of one task, one soup (spec §3, §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoupMethod {
    /// [`Method::Uniform`].
    Uniform,
    /// [`Method::Greedy`].
    Greedy,
    /// [`Method::Learned`] or [`Method::LearnedPlus`].
    Learned,
    /// [`Method::Mehl`] or [`Method::MehlPlus`].
    Mehl,
}

/// The multi-task merges: task models fine-tuned from one base θ_0, merged into one encoder that
/// keeps each task's head (spec §3.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeMethod {
    /// [`Method::AdaMerging`] or [`Method::AdaMergingPlus`].
    AdaMerging,
    /// [`Method::TaskArithmetic`].
    TaskArithmetic,
    /// [`Method::Ties`].
    Ties,
}

/// A method as what it makes: a soup of one task's models, or a multi-task merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A single-task soup.
    Soup(SoupMethod),
    /// A multi-task merge.
    Merge(MergeMethod),
}

impl Method {
    /// Every method, in [`REGISTRY`] order.
    pub const ALL: [Method; 10] = {
        let mut all = [Method::Uniform; 10];
        let mut i = 0;
        while i < REGISTRY.len() {
            all[i] = REGISTRY[i].method;
            i += 1;
        }
        all
    };

    /// The method's line of [`REGISTRY`].
    pub fn info(self) -> &'static MethodInfo {
        REGISTRY
            .iter()
            .find(|m| m.method == self)
            .expect("every method has a registry line")
    }

    /// The method's name on the command line and in recipes.
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// The names of every method, in [`REGISTRY`] order.
    pub fn names() -> Vec<&'static str> {
        REGISTRY.iter().map(|m| m.name).collect()
    }

    /// What the method makes.
    pub fn kind(self) -> Kind {
        match self {
            Method::Uniform => Kind::Soup(SoupMethod::Uniform),
            Method::Greedy => Kind::Soup(SoupMethod::Greedy),
            Method::Learned | Method::LearnedPlus => Kind::Soup(SoupMethod::Learned),
            Method::Mehl | Method::MehlPlus => Kind::Soup(SoupMethod::Mehl),
            Method::AdaMerging | Method::AdaMergingPlus => Kind::Merge(MergeMethod::AdaMerging),
            Method::TaskArithmetic => Kind::Merge(MergeMethod::TaskArithmetic),
            Method::Ties => Kind::Merge(MergeMethod::Ties),
        }
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
        matches!(self.kind(), Kind::Merge(_))
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
        REGISTRY
            .iter()
            .find(|m| m.name == s)
            .map(|m| m.method)
            .ok_or_else(|| {
                format!(
                    "unknown method {s:?} (known: {})",
                    Method::names().join(", ")
                )
            })
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
        // One registry line per method, in ALL's order, each name once.
        assert_eq!(Method::ALL.len(), REGISTRY.len());
        let mut names = Method::names();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        assert_eq!(Method::Ties.kind(), Kind::Merge(MergeMethod::Ties));
        assert_eq!(Method::MehlPlus.kind(), Kind::Soup(SoupMethod::Mehl));
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

    /// The README's methods table says what the registry says, a row per method.
    #[test]
    fn the_readme_methods_table_is_the_registry() {
        let readme = include_str!("../../README.md");
        for m in &REGISTRY {
            let row = format!(
                "| `{}` | {} | {} | {} | {} |",
                m.name,
                m.summary,
                m.paper,
                m.data.describe(),
                m.holds
            );
            assert!(readme.contains(&row), "README.md lacks the row\n{row}");
        }
        // The rows of this table (the data-free merges of `soup merge` have their own).
        let rows = readme
            .lines()
            .skip_while(|l| !l.starts_with("| method | what it makes |"))
            .take_while(|l| l.starts_with('|'))
            .filter(|l| l.starts_with("| `"))
            .count();
        assert_eq!(rows, REGISTRY.len());
    }
}
