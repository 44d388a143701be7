//! soup-models: the model zoo side of soup. It will hold trainable CLIP ViT classifiers and
//! other architectures, checkpoint readers and writers, and data sets, implementing soup-core's
//! `ModelStore` and `Objective` traits (issue [models]). It holds nothing yet.
