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
