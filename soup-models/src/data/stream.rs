//! Images decoded only when a batch asks for them: data memory is a few batches, whatever the
//! size of the data set (ImageNet's held-out split is 15 GB as f32, its validation set 30 GB).
//!
//! A batch is decoded in parallel (rayon, one image per task), and while the model works on a
//! batch the next one is decoded on a thread of its own ([`Stream::prefetch`]). Each image is a
//! pure function of its file, so batches are the same whatever the number of threads.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{check_input, decode_image, prepare_one, square_rgb, Preprocess};
use crate::arch::ImageSpec;
use crate::error::{ModelError, Result};

/// Examples that can be prepared one at a time.
pub trait ImageSource: Send + Sync + std::fmt::Debug {
    /// Channels, height and width of a prepared image.
    fn shape(&self) -> (usize, usize, usize);
    /// Example `i`, prepared for the model (channels × height × width f32), into `out`.
    fn prepare(&self, i: usize, out: &mut [f32]) -> Result<()>;
}

/// Image files (PNG, JPEG) decoded, resized and cropped straight to the model's size
/// ([`Preprocess`]), then normalised.
#[derive(Debug)]
pub struct FolderSource {
    files: Vec<PathBuf>,
    input: ImageSpec,
    preprocess: Preprocess,
    /// Pixels cut from every side before preparing (ObjectNet's 2).
    border: u32,
}

impl FolderSource {
    pub fn new(files: Vec<PathBuf>, input: ImageSpec, preprocess: Preprocess) -> Result<Self> {
        check_input(&input, 3)?;
        Ok(Self {
            files,
            input,
            preprocess,
            border: 0,
        })
    }

    /// The images with `border` pixels cut from every side first (as PIL's
    /// `crop((b, b, w - b, h - b))`); an image too small for it is kept whole.
    pub fn with_border(self, border: u32) -> Self {
        Self { border, ..self }
    }
}

impl ImageSource for FolderSource {
    fn shape(&self) -> (usize, usize, usize) {
        (self.input.channels, self.input.height, self.input.width)
    }

    fn prepare(&self, i: usize, out: &mut [f32]) -> Result<()> {
        let mut img = decode_image(&self.files[i])?.to_rgb8();
        let b = self.border;
        if b > 0 && img.width() > 2 * b && img.height() > 2 * b {
            img = image::imageops::crop_imm(&img, b, b, img.width() - 2 * b, img.height() - 2 * b)
                .to_image();
        }
        let side = self.input.height;
        let planes = square_rgb(&img, side, self.preprocess);
        drop(img);
        prepare_one(&planes, 3, side, side, &self.input, out);
        Ok(())
    }
}

/// A batch being decoded on another thread: its rows, and where the result arrives.
type Pending = (Vec<u32>, Receiver<Result<Vec<f32>>>);

/// An [`ImageSource`] with a one-batch prefetch.
#[derive(Clone, Debug)]
pub struct Stream {
    pub source: Arc<dyn ImageSource>,
    next: Arc<Mutex<Option<Pending>>>,
}

impl Stream {
    pub fn new(source: Arc<dyn ImageSource>) -> Self {
        Self {
            source,
            next: Arc::new(Mutex::new(None)),
        }
    }

    /// The prepared images at `rows`, in order (rows × channels × height × width).
    pub fn batch(&self, rows: &[u32]) -> Result<Tensor> {
        let pending = self
            .next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_if(|(r, _)| r.as_slice() == rows);
        let values = match pending {
            Some((_, arrived)) => arrived.recv().map_err(|_| {
                ModelError::config("data", "the prefetching thread ended without a batch")
            })??,
            None => decode(self.source.as_ref(), rows)?,
        };
        let (c, h, w) = self.source.shape();
        Ok(Tensor::from_vec(
            values,
            (rows.len(), c, h, w),
            &Device::Cpu,
        )?)
    }

    /// Starts decoding the batch at `rows` on a thread of its own; [`Stream::batch`] of the same
    /// rows takes it (any other rows are decoded then, and this batch is dropped).
    pub fn prefetch(&self, rows: Vec<u32>) {
        let (send, arrive) = channel();
        let source = self.source.clone();
        let wanted = rows.clone();
        std::thread::spawn(move || {
            let _ = send.send(decode(source.as_ref(), &wanted));
        });
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) = Some((rows, arrive));
    }
}

/// The prepared images at `rows`, decoded in parallel straight into one buffer, in order.
fn decode(source: &dyn ImageSource, rows: &[u32]) -> Result<Vec<f32>> {
    let (c, h, w) = source.shape();
    let mut out = vec![0f32; rows.len() * c * h * w];
    out.par_chunks_mut(c * h * w)
        .zip(rows.par_iter())
        .try_for_each(|(slot, &r)| source.prepare(r as usize, slot))?;
    Ok(out)
}
