//! ImageNet's distribution shifts by name (`imagenet-v2:DIR`, …), on small stand-ins of each
//! layout as distributed: numbered folders (more than ten, so that "10" sorts before "2" as a
//! string), the 200-class subsets of ImageNet-A and -R (not contiguous), ObjectNet's classes
//! that stand for several of ImageNet's, and its 2-pixel border.

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use soup_core::{Metrics, Objective};
use soup_models::data::imagenet::synsets;
use soup_models::data::{DataSpec, HeadClasses, Split};
use soup_models::testkit::fixtures::{write_image_folder, ScratchDir};
use soup_models::{build, Architecture, Classification};

/// A linear classifier of 3 × 2 × 2 images over ImageNet's 1,000 classes: logit c is
/// bias[c] + weight[c] · Σ pixels (pixels normalised into [−1, 1]).
fn model(bias: &[(usize, f32)], weight: &[(usize, f32)]) -> (Arc<dyn Architecture>, Vec<Tensor>) {
    let arch = build(
        "mlp",
        &serde_json::json!({"input": [3, 2, 2], "hidden": [], "num_classes": 1000}),
    )
    .unwrap();
    let (mut w, mut b) = (vec![0f32; 1000 * 12], vec![0f32; 1000]);
    for &(c, v) in bias {
        b[c] = v;
    }
    for &(c, v) in weight {
        w[c * 12..(c + 1) * 12].fill(v);
    }
    let params = vec![
        Tensor::from_vec(w, (1000, 12), &Device::Cpu).unwrap(),
        Tensor::from_vec(b, 1000, &Device::Cpu).unwrap(),
    ];
    (arch, params)
}

fn evaluate(data: &str, arch: &Arc<dyn Architecture>, params: &[Tensor]) -> Metrics {
    let head = HeadClasses {
        names: arch.class_names().map(<[String]>::to_vec),
        count: Some(arch.num_classes()),
    };
    let data = DataSpec::new(data)
        .stream(Split::Test, &arch.image_input().unwrap(), None, &head)
        .unwrap();
    Classification::new(arch.clone(), data, 8)
        .evaluate(params)
        .unwrap()
}

fn spec(layout: &str, dir: &Path) -> String {
    format!("{layout}:{}", dir.display())
}

#[test]
fn imagenet_v2s_numbered_folders_are_class_indices() {
    let dir = ScratchDir::new("v2");
    let folders: Vec<String> = (0..12).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = folders.iter().map(String::as_str).collect();
    write_image_folder(dir.path(), "", &refs, 1);
    // Folder "10" holds a second image.
    write_image_folder(&dir.path().join("extra"), "", &["10"], 2);
    std::fs::rename(
        dir.path().join("extra/10/1.png"),
        dir.path().join("10/1.png"),
    )
    .unwrap();
    std::fs::remove_dir_all(dir.path().join("extra")).unwrap();
    // The model says class 10 for every image: right for folder "10" alone (2 of 13). Folder
    // "10" is the third in string order: a reading by position would score folder "8" (1 of 13).
    let (arch, params) = model(&[(10, 5.0)], &[]);
    let m = evaluate(&spec("imagenet-v2", dir.path()), &arch, &params);
    assert_eq!((m.accuracy, m.count), (Some(2.0 / 13.0), 13));
    // A model whose classes are named by WordNet ids: folder 10 is synset 10's class.
    let named = soup_models::arch::labels::with_class_names(
        arch.clone(),
        Some(synsets().iter().map(|s| s.to_string()).collect()),
    )
    .unwrap();
    let m = evaluate(&spec("imagenet-v2", dir.path()), &named, &params);
    assert_eq!(m.accuracy, Some(2.0 / 13.0));
}

#[test]
fn imagenet_r_and_a_are_scored_over_their_200_classes() {
    let syn = synsets();
    // ImageNet-R holds classes 1, 4 and 9 (among its 200); 0 is not one of them.
    let dir = ScratchDir::new("r");
    write_image_folder(dir.path(), "", &[syn[1], syn[4], syn[9]], 1);
    // The model prefers class 0, then 4: over all 1,000 classes it says 0 (always wrong); over
    // ImageNet-R's 200 it says 4 (right for one image of three).
    let (arch, params) = model(&[(0, 9.0), (4, 5.0)], &[]);
    let m = evaluate(&spec("imagenet-r", dir.path()), &arch, &params);
    assert_eq!(m.accuracy, Some(1.0 / 3.0));
    // The projection is onto all 200 classes, not the three folders: class 2 (ImageNet-R's,
    // no folder here) outranks 4.
    let (arch2, params2) = model(&[(2, 9.0), (4, 5.0)], &[]);
    let m = evaluate(&spec("imagenet-r", dir.path()), &arch2, &params2);
    assert_eq!(m.accuracy, Some(0.0));
    // Class 1 is not one of ImageNet-A's 200: refused by name.
    let head = HeadClasses {
        names: None,
        count: Some(1000),
    };
    let err = DataSpec::new(&spec("imagenet-a", dir.path()))
        .stream(Split::Test, &arch.image_input().unwrap(), None, &head)
        .unwrap_err()
        .to_string();
    assert!(err.contains(syn[1]) && err.contains("imagenet-a"), "{err}");
    // A head that is not ImageNet's and has no names: refused.
    let small = HeadClasses {
        names: None,
        count: Some(10),
    };
    let err = DataSpec::new(&spec("imagenet-sketch", dir.path()))
        .stream(Split::Test, &arch.image_input().unwrap(), None, &small)
        .unwrap_err()
        .to_string();
    assert!(err.contains("1,000"), "{err}");
}

/// `dir/<class>/0.png`: an 8 × 8 image, black inside a 2-pixel white border.
fn framed(dir: &Path, class: &str) {
    let d = dir.join(class);
    std::fs::create_dir_all(&d).unwrap();
    let img = image::RgbImage::from_fn(8, 8, |x, y| {
        let edge = !(2..6).contains(&x) || !(2..6).contains(&y);
        image::Rgb(if edge { [255; 3] } else { [0; 3] })
    });
    img.save(d.join("0.png")).unwrap();
}

#[test]
fn objectnet_classes_take_the_largest_of_their_imagenet_logits_after_the_border_crop() {
    let dir = ScratchDir::new("objectnet");
    let images = dir.path().join("images");
    // alarm_clock stands for ImageNet classes 409 and 530; chair for 423, 559 and 765.
    // The alarm clock's image is dark inside a white 2-pixel border; the chair's is white.
    framed(&images, "alarm_clock");
    let d = images.join("chair");
    std::fs::create_dir_all(&d).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([255; 3]))
        .save(d.join("0.png"))
        .unwrap();
    // A folder of ObjectNet's that ImageNet lacks is left out.
    framed(&images, "tarp");
    // Bright images favour 765 (the chair's third class), dark ones 530 (the alarm clock's
    // second), through the sum of the pixels.
    let (arch, params) = model(&[], &[(765, 1.0), (530, -1.0)]);
    let m = evaluate(&spec("objectnet", dir.path()), &arch, &params);
    // Both right: the chair through the largest of its classes' logits, the alarm clock only
    // once its border is cut (whole, its image reads bright and is called a chair).
    assert_eq!((m.accuracy, m.count), (Some(1.0), 2));
}
