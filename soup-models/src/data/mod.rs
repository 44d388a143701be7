//! Labelled image data sets in their standard on-disk formats, the held-out split, and the
//! preprocessing that turns them into model inputs.
//!
//! - idx(.gz) files of MNIST and Fashion-MNIST (`train-images-idx3-ubyte.gz`, ...); the name
//!   `fashion-mnist` means the Debian package's `/usr/share/datasets/fashion-mnist`;
//! - CIFAR-10 (`data_batch_{1..5}.bin`, `test_batch.bin`) and CIFAR-100 (`train.bin`, `test.bin`)
//!   binary versions;
//! - ImageFolder, the ImageNet layout: `train/<class>/*.{jpg,jpeg,png}` and `val/<class>/...` (or
//!   `test/`), classes in sorted order, decoded in parallel.
//!
//! The held-out split is carved out of the training split (a seeded fraction, or an index file as
//! model-soups' ImageNet split); the test split is never used to choose anything.
//!
//! One file a job: `spec` (data sets by name, splits), `formats` (idx, CIFAR), `folder` (image
//! folders), `preprocess` (model inputs), `shift` (synthetic shifts), `resize` and `stream`
//! (images decoded batch by batch).

mod folder;
mod formats;
pub mod imagenet;
mod preprocess;
pub mod resize;
mod shift;
mod spec;
pub mod stream;
pub mod text;

pub use folder::{
    class_folders, decode_image, label_folders, list_image_folder, HeadClasses, ListedFolder,
    IMAGE_FOLDER_SIDE, MAX_IMAGE_BYTES,
};
pub(crate) use preprocess::{check_input, prepare_one};
pub use preprocess::{prepare, resize_crop_planes, square_rgb, Preprocess};
pub use shift::{shifted, Shift};
pub use spec::{DataSpec, Heldout, RawImages, Split, FASHION_MNIST_DIR};
