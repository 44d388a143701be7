//! Parameter layouts and block cuts (spec §3.4).
//!
//! A model is an ordered list of named tensors. A block is a contiguous run of those tensors that
//! shares one coefficient per model; MEHL-Soup uses one block, MEHL-Soup+ one block per tensor.

use std::ops::Range;

use candle_core::{Tensor, D};

use crate::error::{Result, SoupError};

/// One named tensor of a model: its name and shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// The tensor's name in the model's state dict.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered named tensors of a model. Every model of a zoo has the same layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// The tensors, in the model's order.
    pub tensors: Vec<TensorSpec>,
}

impl ParamLayout {
    /// The layout of `tensors`, in that order.
    pub fn new(tensors: Vec<TensorSpec>) -> Self {
        Self { tensors }
    }

    /// The layout of `tensors`, named by `names` in the same order.
    pub fn of(names: &[String], tensors: &[Tensor]) -> Self {
        Self::new(
            names
                .iter()
                .zip(tensors)
                .map(|(name, t)| TensorSpec {
                    name: name.clone(),
                    shape: t.dims().to_vec(),
                })
                .collect(),
        )
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the layout has no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of parameters, D.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(TensorSpec::numel).sum()
    }

    /// Checks that `other`, the layout of model `model`, equals this one; the error names the
    /// model and the first tensor that differs.
    pub fn check_same(&self, model: &str, other: &ParamLayout) -> Result<()> {
        for (i, mine) in self.tensors.iter().enumerate() {
            let Some(theirs) = other.tensors.get(i) else {
                return Err(mismatch(model, &mine.name, "tensor missing"));
            };
            if theirs.name != mine.name {
                return Err(mismatch(
                    model,
                    &mine.name,
                    format!("found {} in its place", theirs.name),
                ));
            }
            if theirs.shape != mine.shape {
                return Err(mismatch(
                    model,
                    &mine.name,
                    format!("shape {:?}, expected {:?}", theirs.shape, mine.shape),
                ));
            }
        }
        if let Some(extra) = other.tensors.get(self.tensors.len()) {
            return Err(mismatch(
                model,
                &extra.name,
                "tensor not in the first model",
            ));
        }
        Ok(())
    }

    /// Checks that `tensors`, loaded for model `model`, have this layout's count and shapes.
    pub fn check_tensors(&self, model: &str, tensors: &[Tensor]) -> Result<()> {
        if tensors.len() != self.tensors.len() {
            let name = self
                .tensors
                .get(tensors.len())
                .map_or("<extra>", |t| t.name.as_str());
            return Err(mismatch(
                model,
                name,
                format!("{} tensors, expected {}", tensors.len(), self.tensors.len()),
            ));
        }
        for (spec, t) in self.tensors.iter().zip(tensors) {
            if t.dims() != spec.shape.as_slice() {
                return Err(mismatch(
                    model,
                    &spec.name,
                    format!("shape {:?}, expected {:?}", t.dims(), spec.shape),
                ));
            }
        }
        Ok(())
    }
}

fn mismatch(model: &str, tensor: &str, detail: impl ToString) -> SoupError {
    SoupError::LayoutMismatch {
        model: model.to_string(),
        tensor: tensor.to_string(),
        detail: detail.to_string(),
    }
}

/// A block: the contiguous tensors `tensors` of the layout, `numel` parameters in all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// The block's name: its first tensor's, or the layer's.
    pub name: String,
    /// The tensors of the layout it holds, contiguous.
    pub tensors: Range<usize>,
    /// Their elements, in all.
    pub numel: usize,
}

/// Per block, whether every tensor of it is named in `frozen_tensors` (such a block's
/// coefficients are not learned).
pub fn frozen_blocks(
    blocks: &[Block],
    layout: &ParamLayout,
    frozen_tensors: &[String],
) -> Vec<bool> {
    blocks
        .iter()
        .map(|b| {
            layout.tensors[b.tensors.clone()]
                .iter()
                .all(|t| frozen_tensors.contains(&t.name))
        })
        .collect()
}

/// How tensors are grouped into blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockCut {
    /// The authors' `--layer-size S`: walk the tensors in order and start a new block when the
    /// current one already holds more than S elements. S = 0 gives one block per tensor
    /// (MEHL-Soup+), S ≥ D one block (MEHL-Soup).
    LayerSize(usize),
    /// One block per layer: tensors whose names contain `marker` followed by the same layer index
    /// (e.g. marker `layers.` groups `encoder.layers.3.*`) share a block; every other tensor is a
    /// block of its own.
    PerLayer {
        /// What precedes the layer index in a tensor's name.
        marker: String,
    },
}

impl BlockCut {
    /// One block for the whole model (MEHL-Soup, Learned-Soup).
    pub const WHOLE: BlockCut = BlockCut::LayerSize(usize::MAX);
    /// One block per tensor (MEHL-Soup+, Learned-Soup+).
    pub const PER_TENSOR: BlockCut = BlockCut::LayerSize(0);

    /// Cuts `layout` into blocks. The blocks are contiguous, in order, and cover every tensor once.
    pub fn blocks(&self, layout: &ParamLayout) -> Result<Vec<Block>> {
        if layout.is_empty() {
            return Err(SoupError::EmptyLayout);
        }
        let mut blocks: Vec<Block> = Vec::new();
        let mut open_key: Option<String> = None;
        for (i, spec) in layout.tensors.iter().enumerate() {
            let (start_new, key) = match (self, blocks.last()) {
                (_, None) => (true, self.key(&spec.name)),
                (BlockCut::LayerSize(s), Some(last)) => (last.numel > *s, None),
                (BlockCut::PerLayer { .. }, Some(_)) => {
                    let key = self.key(&spec.name);
                    (key.is_none() || key != open_key, key)
                }
            };
            if start_new {
                open_key = key;
                blocks.push(Block {
                    name: open_key.clone().unwrap_or_else(|| spec.name.clone()),
                    tensors: i..i,
                    numel: 0,
                });
            }
            let last = blocks.last_mut().expect("a block was opened above");
            last.tensors.end = i + 1;
            last.numel += spec.numel();
        }
        for b in &mut blocks {
            if matches!(self, BlockCut::LayerSize(_)) && b.tensors.len() > 1 {
                b.name = format!(
                    "{}..{}",
                    layout.tensors[b.tensors.start].name,
                    layout.tensors[b.tensors.end - 1].name
                );
            }
        }
        Ok(blocks)
    }

    /// The layer key of a tensor name under `PerLayer`: the name up to and including the layer index.
    fn key(&self, name: &str) -> Option<String> {
        let BlockCut::PerLayer { marker } = self else {
            return None;
        };
        let at = name.find(marker.as_str())? + marker.len();
        let digits = name[at..].bytes().take_while(u8::is_ascii_digit).count();
        (digits > 0).then(|| name[..at + digits].to_string())
    }
}

/// The block vectors of a model: for each block, its tensors flattened and concatenated (a view
/// when the block holds one contiguous tensor).
pub fn to_blocks(params: &[Tensor], blocks: &[Block]) -> Result<Vec<Tensor>> {
    blocks
        .iter()
        .map(|b| {
            let flat: Vec<Tensor> = params[b.tensors.clone()]
                .iter()
                .map(Tensor::flatten_all)
                .collect::<candle_core::Result<_>>()?;
            Ok(if flat.len() == 1 {
                flat.into_iter().next().expect("one tensor")
            } else {
                Tensor::cat(&flat, D::Minus1)?
            })
        })
        .collect()
}

/// The inverse of [`to_blocks`]: named tensors with the layout's shapes (views, no copies).
pub fn from_blocks(
    block_vectors: &[Tensor],
    blocks: &[Block],
    layout: &ParamLayout,
) -> Result<Vec<Tensor>> {
    let mut out = Vec::with_capacity(layout.len());
    for (b, v) in blocks.iter().zip(block_vectors) {
        let mut offset = 0;
        for spec in &layout.tensors[b.tensors.clone()] {
            let n = spec.numel();
            out.push(v.narrow(0, offset, n)?.reshape(spec.shape.as_slice())?);
            offset += n;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(sizes: &[(&str, usize)]) -> ParamLayout {
        ParamLayout::new(
            sizes
                .iter()
                .map(|(n, s)| TensorSpec {
                    name: n.to_string(),
                    shape: vec![*s],
                })
                .collect(),
        )
    }

    #[test]
    fn layer_size_rule_of_the_authors() {
        let l = layout(&[("a", 4), ("b", 3), ("c", 5), ("d", 1)]);
        let ranges = |cut: BlockCut| -> Vec<Range<usize>> {
            cut.blocks(&l)
                .unwrap()
                .into_iter()
                .map(|b| b.tensors)
                .collect()
        };
        assert_eq!(ranges(BlockCut::PER_TENSOR), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(ranges(BlockCut::WHOLE), vec![0..4]);
        assert_eq!(ranges(BlockCut::LayerSize(13)), vec![0..4]);
        // 4 > 3 closes {a}; {b} holds 3, not more than 3, so c joins; {b,c} = 8 > 3 closes.
        assert_eq!(ranges(BlockCut::LayerSize(3)), vec![0..1, 1..3, 3..4]);
    }

    #[test]
    fn per_layer_groups_by_index() {
        let l = layout(&[
            ("emb", 2),
            ("enc.layers.0.q", 2),
            ("enc.layers.0.k", 2),
            ("enc.layers.1.q", 2),
            ("enc.layers.10.q", 2),
            ("post", 1),
            ("head", 1),
        ]);
        let blocks = BlockCut::PerLayer {
            marker: "layers.".into(),
        }
        .blocks(&l)
        .unwrap();
        let got: Vec<(String, Range<usize>)> =
            blocks.into_iter().map(|b| (b.name, b.tensors)).collect();
        assert_eq!(
            got,
            vec![
                ("emb".to_string(), 0..1),
                ("enc.layers.0".to_string(), 1..3),
                ("enc.layers.1".to_string(), 3..4),
                ("enc.layers.10".to_string(), 4..5),
                ("post".to_string(), 5..6),
                ("head".to_string(), 6..7),
            ]
        );
    }

    #[test]
    fn empty_layout_is_an_error() {
        assert!(matches!(
            BlockCut::WHOLE.blocks(&ParamLayout::new(vec![])),
            Err(SoupError::EmptyLayout)
        ));
    }

    #[test]
    fn mismatch_names_model_and_tensor() {
        let a = layout(&[("w", 3), ("b", 2)]);
        let b = layout(&[("w", 3), ("b", 4)]);
        let msg = a.check_same("model-7", &b).unwrap_err().to_string();
        assert!(msg.contains("model-7") && msg.contains("tensor b"), "{msg}");
    }
}
