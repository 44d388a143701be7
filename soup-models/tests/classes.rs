//! Class identity: a head's class names, and an image folder's class folders matched to them
//! (by name; numbered folders as integers for a model without names), with the logits of a
//! split that holds fewer classes restricted to them (model-soups' projection).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use soup_core::{Metrics, Objective};
use soup_models::arch::labels::{hf_class_names, with_class_names};
use soup_models::data::{list_image_folder, DataSpec, HeadClasses, Split};
use soup_models::testkit::fixtures::{write_image_folder as folder, ScratchDir};
use soup_models::{build, Architecture, Classification};

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// A linear classifier of 3 × 2 × 2 images whose weights are zero and whose bias is `bias`:
/// it predicts argmax(bias) for every image.
fn constant(bias: &[f32]) -> (Arc<dyn Architecture>, Vec<Tensor>) {
    let k = bias.len();
    let arch = build(
        "mlp",
        &serde_json::json!({"input": [3, 2, 2], "hidden": [], "num_classes": k}),
    )
    .unwrap();
    let params = vec![
        Tensor::zeros((k, 12), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::new(bias, &Device::Cpu).unwrap(),
    ];
    (arch, params)
}

fn evaluate(arch: &Arc<dyn Architecture>, params: &[Tensor], root: &Path) -> Metrics {
    let head = HeadClasses {
        names: arch.class_names().map(<[String]>::to_vec),
        count: Some(arch.num_classes()),
    };
    let data = DataSpec::new(root.to_str().unwrap())
        .stream(Split::Test, &arch.image_input().unwrap(), None, &head)
        .unwrap();
    Classification::new(arch.clone(), data, 4)
        .evaluate(params)
        .unwrap()
}

#[test]
fn numbered_folders_are_class_indices_not_strings() {
    let dir = ScratchDir::new("numbered");
    let classes: Vec<String> = (0..12).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = classes.iter().map(String::as_str).collect();
    folder(dir.path(), "val", &refs, 1);
    let head = HeadClasses {
        names: None,
        count: Some(12),
    };
    let listed = list_image_folder(dir.path(), true, &head).unwrap();
    // Folders are listed in string order (0, 1, 10, 11, 2, …); each keeps its own number.
    for (path, label) in &listed.files {
        let folder = path
            .parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(folder.parse::<u32>().unwrap(), *label, "{}", path.display());
    }
    assert_eq!(listed.files.len(), 12);
    assert_eq!(listed.groups, None);
    // A head of 11 classes has no class 11.
    let small = HeadClasses {
        names: None,
        count: Some(11),
    };
    let err = list_image_folder(dir.path(), true, &small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"11\""), "{err}");
}

#[test]
fn folders_are_matched_to_the_heads_names_whatever_their_order() {
    let dir = ScratchDir::new("named");
    // The head's order is not the folders' sorted order.
    folder(dir.path(), "val", &["apple", "kiwi", "zucchini"], 2);
    let head = HeadClasses {
        names: Some(names(&["zucchini", "apple", "kiwi"])),
        count: Some(3),
    };
    let listed = list_image_folder(dir.path(), true, &head).unwrap();
    let labels: Vec<u32> = listed.files.iter().map(|(_, l)| *l).collect();
    assert_eq!(labels, vec![1, 1, 2, 2, 0, 0]);
    assert_eq!(listed.groups, None);
    // A folder that names no class is an error naming it.
    folder(dir.path(), "val", &["pear"], 1);
    let err = list_image_folder(dir.path(), true, &head)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"pear\"") && err.contains("not a class"),
        "{err}"
    );
}

#[test]
fn a_split_of_fewer_classes_restricts_the_logits_to_them() {
    let dir = ScratchDir::new("subset");
    // Classes 1 and 3 of a, b, c, d: not contiguous.
    folder(dir.path(), "val", &["b", "d"], 1);
    let (arch, params) = constant(&[0.0, 1.0, 5.0, 2.0]);
    let arch = with_class_names(arch, Some(names(&["a", "b", "c", "d"]))).unwrap();
    let head = HeadClasses {
        names: Some(names(&["a", "b", "c", "d"])),
        count: Some(4),
    };
    let listed = list_image_folder(dir.path(), true, &head).unwrap();
    assert_eq!(listed.groups, Some(vec![vec![1], vec![3]]));
    // Over all four classes the model predicts c (wrong for both images); over b and d it
    // predicts d: one of two right, and the loss is that of logits (1, 2).
    let m = evaluate(&arch, &params, dir.path());
    assert_eq!(m.accuracy, Some(0.5));
    let lse = (1f64.exp() + 2f64.exp()).ln();
    let want = ((lse - 1.0) + (lse - 2.0)) / 2.0;
    assert!((m.loss - want).abs() < 1e-5, "{} vs {want}", m.loss);
    // The training split is never projected.
    folder(dir.path(), "train", &["b", "d"], 1);
    let train = list_image_folder(dir.path(), false, &head).unwrap();
    assert_eq!(train.groups, None);
}

#[test]
fn an_evaluation_only_folder_is_a_data_set() {
    let dir = ScratchDir::new("evalonly");
    folder(dir.path(), "test", &["0", "2"], 1);
    let (arch, params) = constant(&[0.0, 0.0, 1.0]);
    // Numbered folders of a model without names: classes 0 and 2 of 3, restricted.
    let m = evaluate(&arch, &params, dir.path());
    assert_eq!((m.accuracy, m.count), (Some(0.5), 2));
    // Named folders and a model without names: nothing to match them with.
    let named = ScratchDir::new("evalonly-named");
    folder(named.path(), "val", &["cat", "dog"], 1);
    let head = HeadClasses {
        names: None,
        count: Some(2),
    };
    let err = list_image_folder(named.path(), true, &head)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--class-names"), "{err}");
    // Training needs train/.
    let err = list_image_folder(named.path(), false, &head)
        .unwrap_err()
        .to_string();
    assert!(err.contains("train/"), "{err}");
}

#[test]
fn class_names_live_in_the_config_and_in_id2label() {
    let (arch, _) = constant(&[0.0, 0.0, 0.0]);
    let named = with_class_names(arch.clone(), Some(names(&["x", "y", "z"]))).unwrap();
    // soup's configuration rebuilds the names.
    let again = build(named.family(), &named.config()).unwrap();
    assert_eq!(again.class_names().unwrap(), names(&["x", "y", "z"]));
    // transformers' id2label / label2id.
    let hf = named.hf_config();
    assert_eq!(hf["id2label"]["1"], "y");
    assert_eq!(hf["label2id"]["z"], 2);
    assert_eq!(hf_class_names(&hf, 3), Some(names(&["x", "y", "z"])));
    // transformers' placeholders mean no names.
    let placeholders = serde_json::json!({"id2label": {"0": "LABEL_0", "1": "LABEL_1"}});
    assert_eq!(hf_class_names(&placeholders, 2), None);
    // Names that do not fit the head are refused.
    for bad in [
        names(&["x", "y"]),
        names(&["x", "y", "x"]),
        names(&["x", "", "z"]),
    ] {
        assert!(
            with_class_names(arch.clone(), Some(bad.clone())).is_err(),
            "{bad:?}"
        );
    }
    // Replacing and removing names.
    let renamed = with_class_names(named.clone(), Some(names(&["p", "q", "r"]))).unwrap();
    assert_eq!(renamed.class_names().unwrap()[0], "p");
    assert!(with_class_names(named, None)
        .unwrap()
        .class_names()
        .is_none());
}
