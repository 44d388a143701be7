//! Class identity end to end: `soup train` on an image folder records its classes' names
//! (`config.json`'s id2label), `soup eval` matches an evaluation folder's classes to them by
//! name (an evaluation-only folder, a subset of the classes, renamed with `--class-names`), and
//! bad names or folders are refused with one line and exit code 2.

use soup_models::testkit::fixtures::{write_image_folder, ScratchDir};

mod common;
use common::{fails, json, ok};

#[test]
fn trained_classes_are_named_and_evaluation_folders_matched_by_name() {
    let dir = ScratchDir::new("classes");
    let root = dir.path();
    let data = root.join("data");
    write_image_folder(&data, "train", &["cat", "dog", "emu"], 6);
    let config = root.join("mlp.json");
    std::fs::write(
        &config,
        r#"{"input": [3, 2, 2], "hidden": [], "num_classes": 3}"#,
    )
    .unwrap();
    let model = root.join("model");
    let s = |p: &std::path::Path| p.display().to_string();
    ok(&[
        "train",
        "--arch",
        "mlp",
        "--config",
        &s(&config),
        "--data",
        &s(&data),
        "--epochs",
        "1",
        "--out",
        &s(&model),
    ]);
    let hf = json(model.join("config.json"));
    assert_eq!(hf["id2label"]["0"], "cat");
    assert_eq!(hf["id2label"]["2"], "emu");
    assert_eq!(hf["label2id"]["dog"], 1);

    // An evaluation-only folder holding two of the three classes: scored over those two.
    let shifted = root.join("shifted");
    write_image_folder(&shifted, "val", &["emu", "cat"], 2);
    let out = ok(&["eval", "--model", &s(&model), "--data", &s(&shifted)]);
    assert!(
        out.contains("restricted to the split's 2 of the head's 3 classes"),
        "{out}"
    );
    let out = ok(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&shifted),
        "--json",
    ]);
    let scores: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (scores["count"].as_u64(), scores["classes_scored"].as_u64()),
        (Some(4), Some(2))
    );

    // Renamed by --class-names: the folders are matched to the new names.
    let renamed = root.join("renamed");
    write_image_folder(&renamed, "val", &["gato", "perro", "emú"], 1);
    let names = root.join("es.txt");
    std::fs::write(&names, "gato\nperro\nemú\n").unwrap();
    let out = ok(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &s(&renamed),
        "--class-names",
        &s(&names),
    ]);
    assert!(
        out.contains("3 examples") && !out.contains("restricted"),
        "{out}"
    );

    // Refused: a folder no class is named, names given twice, too few names.
    let stranger = root.join("stranger");
    write_image_folder(&stranger, "val", &["cat", "fox"], 1);
    fails(
        &["eval", "--model", &s(&model), "--data", &s(&stranger)],
        "\"fox\"",
    );
    fails(
        &["eval", "--model", &s(&model), "--data", &s(&renamed)],
        "is not a class of the model",
    );
    let twice = root.join("twice.txt");
    std::fs::write(&twice, "a\nb\na\n").unwrap();
    fails(
        &[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &s(&renamed),
            "--class-names",
            &s(&twice),
        ],
        "line 3 repeats \"a\" of line 1",
    );
    let short = root.join("short.txt");
    std::fs::write(&short, "a\nb\n").unwrap();
    fails(
        &[
            "eval",
            "--model",
            &s(&model),
            "--data",
            &s(&renamed),
            "--class-names",
            &s(&short),
        ],
        "2 class names for a head of 3 classes",
    );
}

#[test]
fn evaluation_sets_are_scored_by_name_beside_the_data() {
    let dir = ScratchDir::new("testsets");
    let root = dir.path();
    let s = |p: &std::path::Path| p.display().to_string();
    let data = root.join("data");
    write_image_folder(&data, "train", &["cat", "dog", "emu"], 6);
    write_image_folder(&data, "val", &["cat", "dog", "emu"], 2);
    let config = root.join("mlp.json");
    std::fs::write(
        &config,
        r#"{"input": [3, 2, 2], "hidden": [4], "num_classes": 3}"#,
    )
    .unwrap();
    let mut zoo = String::new();
    for seed in ["1", "2"] {
        let out = root.join(format!("m{seed}"));
        ok(&[
            "train",
            "--arch",
            "mlp",
            "--config",
            &s(&config),
            "--data",
            &s(&data),
            "--epochs",
            "2",
            "--seed",
            seed,
            "--out",
            &s(&out),
        ]);
        zoo.push_str(&format!("[[model]]\npath = {:?}\n\n", s(&out)));
    }
    std::fs::write(root.join("zoo.toml"), zoo).unwrap();
    // Two evaluation-only sets: a subset of the classes, and all of them in another order.
    let (a, b) = (root.join("shift-a"), root.join("shift-b"));
    write_image_folder(&a, "val", &["emu", "cat"], 3);
    write_image_folder(&b, "test", &["dog", "emu", "cat"], 2);
    let soup = root.join("soup");
    let tests = format!("{},{}", s(&a), s(&b));
    let stdout = ok(&[
        "mix",
        "--method",
        "uniform",
        "--zoo",
        &s(&root.join("zoo.toml")),
        "--data",
        &s(&data),
        "--test",
        &tests,
        "--out",
        &s(&soup),
    ]);
    assert!(
        stdout.contains("mean accuracy over 2 --test sets"),
        "{stdout}"
    );
    let report = json(soup.join("report.json"));
    let sets = report["tests"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!(
        (sets[0]["name"].as_str(), sets[1]["name"].as_str()),
        (Some("shift-a"), Some("shift-b"))
    );
    assert_eq!(sets[0]["classes_scored"], 2);
    assert!(sets[1].get("classes_scored").is_none());
    // Each set's scores are what soup eval gives the soup on it; the mean is theirs.
    let mut sum = 0.0;
    for (set, path) in sets.iter().zip([&a, &b]) {
        let eval = ok(&["eval", "--model", &s(&soup), "--data", &s(path), "--json"]);
        let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
        assert_eq!(eval["accuracy"], set["accuracy"]);
        assert_eq!(eval["count"], set["count"]);
        sum += set["accuracy"].as_f64().unwrap();
    }
    assert!((report["tests_mean_accuracy"].as_f64().unwrap() - sum / 2.0).abs() < 1e-12);
    assert!(std::fs::read_to_string(soup.join("README.md"))
        .unwrap()
        .contains("| shift-a |"));
    // soup eval --test gives the same.
    let eval = ok(&[
        "eval",
        "--model",
        &s(&soup),
        "--data",
        &s(&data),
        "--test",
        &tests,
        "--json",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(eval["tests"][1]["accuracy"], sets[1]["accuracy"]);
    assert_eq!(eval["tests_mean_accuracy"], report["tests_mean_accuracy"]);
    // A set that is not a data set is refused before any work.
    fails(
        &[
            "mix",
            "--method",
            "uniform",
            "--zoo",
            &s(&root.join("zoo.toml")),
            "--data",
            &s(&data),
            "--test",
            &s(&root.join("nowhere")),
            "--out",
            &s(&root.join("bad")),
        ],
        "--test",
    );
    assert!(!root.join("bad").exists() && !root.join("bad.partial").exists());
}

#[test]
fn imagenet_shifts_are_named_layouts() {
    use candle_core::{Device, Tensor};
    let dir = ScratchDir::new("layouts");
    let root = dir.path();
    let s = |p: &std::path::Path| p.display().to_string();
    // A classifier of ImageNet's 1,000 classes, without names (as model-soups' checkpoints).
    let arch = soup_models::build(
        "mlp",
        &serde_json::json!({"input": [3, 2, 2], "hidden": [], "num_classes": 1000}),
    )
    .unwrap();
    let params = vec![
        Tensor::zeros((1000, 12), candle_core::DType::F32, &Device::Cpu).unwrap(),
        Tensor::zeros(1000, candle_core::DType::F32, &Device::Cpu).unwrap(),
    ];
    let model = root.join("model");
    soup_models::checkpoint::write_model_dir(
        &model,
        arch.as_ref(),
        &params,
        &Default::default(),
        "",
    )
    .unwrap();
    let syn = soup_models::data::imagenet::synsets();
    let (v2, r) = (root.join("v2"), root.join("r"));
    write_image_folder(&v2, "", &["0", "7", "999"], 1);
    write_image_folder(&r, "", &[syn[1], syn[4]], 1);
    let out = ok(&[
        "eval",
        "--model",
        &s(&model),
        "--data",
        &format!("imagenet-v2:{}", s(&v2)),
        "--test",
        &format!("imagenet-r:{}", s(&r)),
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["count"], 3);
    assert!(v.get("classes_scored").is_none());
    assert_eq!(v["tests"][0]["name"], "imagenet-r");
    assert_eq!(v["tests"][0]["classes_scored"], 200);
    // An evaluation set has no training split.
    fails(
        &[
            "train",
            "--init",
            &s(&model),
            "--data",
            &format!("imagenet-r:{}", s(&r)),
            "--out",
            &s(&root.join("trained")),
        ],
        "evaluation set",
    );
}
