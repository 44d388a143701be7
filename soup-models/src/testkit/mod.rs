//! Test support, compiled only with the cargo feature `testkit` (the test suites of the
//! workspace turn it on; no default build carries it): checkpoints made at test time, a
//! `torch.save` writer, and a Hugging Face Hub stand-in on 127.0.0.1.

pub mod fixtures;
#[cfg(feature = "hub")]
pub mod hub;
pub mod torch;
