//! The instruction sets the hot loops are compiled for, chosen once at run time.

#![allow(clippy::disallowed_methods)] // CPU only: tensors of data already on the host.

/// The instruction sets the hot loops are compiled for, chosen once at run time from what the
/// CPU has. The arithmetic is the same in each (the lanes of the reductions are explicit, and Rust
/// neither reassociates nor fuses floating-point operations), so results are bit for bit equal
/// whichever runs; only the width of the vectors differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The target's baseline (SSE2 on x86-64).
    Baseline,
    /// AVX2 and FMA (x86-64).
    Avx2,
    /// AVX-512 F/BW/VL (x86-64).
    Avx512,
}

impl Isa {
    /// The widest set this CPU has.
    pub fn detected() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
                {
                    return Isa::Avx512;
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    return Isa::Avx2;
                }
            }
            Isa::Baseline
        })
    }

    /// Every set this CPU can run, narrowest first (for tests).
    pub fn available() -> Vec<Isa> {
        [Isa::Baseline, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| i == Isa::Baseline || i as u8 <= Isa::detected() as u8)
            .collect()
    }
}
