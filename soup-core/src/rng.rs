//! Seeded randomness with a fixed algorithm (SplitMix64), so a seed means the same model order and
//! data order on every machine and every version of the dependencies (spec §5 item 10).

/// SplitMix64 (Steele, Lea, Flood 2014): small, fast, and fully specified.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The generator of `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (Lemire's multiply-shift; the bias is below 2^-64 · n).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl SplitMix64 {
    /// `n` standard normal samples (Box–Muller, cosine branch).
    pub fn normals(&mut self, n: usize) -> Vec<f64> {
        (0..n)
            .map(|_| {
                let u1 = 1.0 - self.next_f64();
                let u2 = self.next_f64();
                (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
            })
            .collect()
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        p.swap(i, j);
    }
    p
}

/// Derives an independent seed from a base seed and a path of indices (outer pass, model batch,
/// inner epoch, ...), so every random stream of a run is fixed by the run's one seed.
pub fn derive_seed(seed: u64, path: &[u64]) -> u64 {
    let mut rng = SplitMix64::new(seed);
    let mut s = rng.next_u64();
    for &p in path {
        rng = SplitMix64::new(s ^ p.wrapping_mul(0xA24B_AED4_963E_E407));
        s = rng.next_u64();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_permutation() {
        for n in [0, 1, 2, 7, 100] {
            let mut p = permutation(n, 42);
            p.sort_unstable();
            assert_eq!(p, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn seeds_differ_by_path() {
        assert_ne!(derive_seed(1, &[0]), derive_seed(1, &[1]));
        assert_ne!(derive_seed(1, &[0, 1]), derive_seed(1, &[1, 0]));
        assert_eq!(derive_seed(7, &[3, 4]), derive_seed(7, &[3, 4]));
        assert_ne!(permutation(50, 1), permutation(50, 2));
    }
}
