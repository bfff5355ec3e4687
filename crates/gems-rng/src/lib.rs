//! The seeded random streams of the gems workspace.
//!
//! Sketch matrices, negative samples and task splits must be reproducible from a recorded seed
//! across crate versions and platforms, so the generator lives here (SplitMix64, Steele, Lea,
//! Flood 2014) rather than in a crate whose stream may change between releases. Every crate of
//! the workspace draws from this one definition. No dependencies.

/// SplitMix64: 64-bit state, one add and a mixing function per draw; passes BigCrush.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator whose stream is fully determined by `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }
    /// A generator whose stream depends on a seed and a list of stream labels (user index,
    /// split, ...), so each stream is reproducible on its own whatever order streams are used in.
    pub fn for_stream(seed: u64, labels: &[u64]) -> Self {
        let mut mixer = SplitMix64::new(seed);
        let mut state = mixer.next_u64();
        for &label in labels {
            state = SplitMix64::new(state ^ label.wrapping_mul(0xD605_BBB5_8C8A_BBC3)).next_u64();
        }
        Self::new(state)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` (Lemire's multiply-shift with rejection, unbiased).
    ///
    /// # Panics
    /// If `n == 0` (a caller's bug).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "SplitMix64::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let product = u128::from(self.next_u64()) * u128::from(n);
            if (product as u64) >= threshold {
                return (product >> 64) as u64;
            }
        }
    }

    /// Shuffles `items` in place, every order equally likely (Fisher-Yates from the back: for
    /// `i` from `len - 1` down to 1, swap `items[i]` with `items[below(i + 1)]`).
    ///
    /// Draws exactly `len - 1` values (none for fewer than two items). The order of the draws
    /// is part of the reproducibility contract (batch orders are recorded by seed), so it must
    /// not change.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// Moves a uniform sample of `k` distinct elements of `items`, in random order, to the
    /// front and returns it (`&mut items[..k]`); `k` is capped at `items.len()`. The rest of
    /// `items` holds the elements not drawn, in no particular order.
    ///
    /// This is the first `k` steps of a Fisher-Yates shuffle from the front: for `i` in `0..k`,
    /// swap `items[i]` with `items[i + below(len - i)]`. Draws exactly `min(k, len)` values;
    /// as for [`SplitMix64::shuffle`], that sequence must not change.
    pub fn partial_shuffle<'a, T>(&mut self, items: &'a mut [T], k: usize) -> &'a mut [T] {
        let (k, len) = (k.min(items.len()), items.len());
        for i in 0..k {
            let j = i + self.below((len - i) as u64) as usize;
            items.swap(i, j);
        }
        &mut items[..k]
    }

    /// A uniform float in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A uniform draw in the open interval (0, 1) (never exactly 0, so `ln` is safe).
    pub fn next_open01(&mut self) -> f64 {
        // 53 random mantissa bits, shifted by half an ulp away from zero.
        ((self.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// One standard normal draw (Box-Muller, cosine branch): consumes two uniforms from
    /// [`SplitMix64::next_open01`] and returns `sqrt(-2 ln u1) * cos(2 pi u2)`; the sine branch
    /// is discarded, so consecutive draws are independent and each costs two `next_u64` calls.
    /// (Use [`SplitMix64::fill_standard_normal`] to use both branches.)
    pub fn normal(&mut self) -> f64 {
        self.normal_pair().0
    }

    /// Fills `out` with independent standard normal draws (Box-Muller, both outputs used).
    pub fn fill_standard_normal(&mut self, out: &mut [f64]) {
        let mut chunks = out.chunks_exact_mut(2);
        for pair in &mut chunks {
            let (a, b) = self.normal_pair();
            pair[0] = a;
            pair[1] = b;
        }
        if let [last] = chunks.into_remainder() {
            *last = self.normal_pair().0;
        }
    }

    fn normal_pair(&mut self) -> (f64, f64) {
        let u1 = self.next_open01();
        let u2 = self.next_open01();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        (radius * angle.cos(), radius * angle.sin())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_stream() {
        // Reference values of SplitMix64 seeded with 0 (as in the Java and C reference code).
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut rng = SplitMix64::new(7);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            let x = rng.below(10) as usize;
            seen[x] = true;
        }
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn streams_differ_by_label() {
        let a = SplitMix64::for_stream(1, &[0, 1]).next_u64();
        let b = SplitMix64::for_stream(1, &[1, 0]).next_u64();
        assert_ne!(a, b);
    }

    #[test]
    fn same_seed_same_stream_and_reference_values() {
        // Reference values of SplitMix64 with seed 0 (Vigna's C reference implementation).
        let mut g = SplitMix64::new(0);
        assert_eq!(g.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(g.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        let (mut x, mut y) = (vec![0.0; 7], vec![0.0; 7]);
        a.fill_standard_normal(&mut x);
        b.fill_standard_normal(&mut y);
        assert_eq!(x, y);
    }

    #[test]
    fn single_normal_is_the_cosine_branch_and_plausible() {
        // `normal()` is the first output of a Box-Muller pair from the same two uniforms.
        let mut a = SplitMix64::new(11);
        let mut b = SplitMix64::new(11);
        let mut pair = [0.0; 2];
        for _ in 0..100 {
            b.fill_standard_normal(&mut pair);
            assert_eq!(a.normal().to_bits(), pair[0].to_bits());
        }
        let mut g = SplitMix64::new(5);
        let x: Vec<f64> = (0..200_000).map(|_| g.normal()).collect();
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }

    #[test]
    fn shuffle_is_the_pinned_backward_fisher_yates() {
        // The draw sequence is a contract: the same loop written out, and literal values
        // (computed independently, from a Python SplitMix64).
        for (seed, n) in [(1, 0), (1, 1), (2, 2), (3, 10), (4, 257)] {
            let mut a = SplitMix64::new(seed);
            let mut b = SplitMix64::new(seed);
            let mut got: Vec<usize> = (0..n).collect();
            a.shuffle(&mut got);
            let mut want: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                let j = b.below(i as u64 + 1) as usize;
                want.swap(i, j);
            }
            assert_eq!(got, want, "seed {seed}, n {n}");
            assert_eq!(a.next_u64(), b.next_u64(), "seed {seed}, n {n}: same number of draws");
            let mut sorted = got.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
        }
        let mut order: Vec<u32> = (0..10).collect();
        SplitMix64::new(42).shuffle(&mut order);
        assert_eq!(order, [8, 3, 6, 5, 4, 0, 9, 2, 1, 7]);
    }

    #[test]
    fn partial_shuffle_is_the_pinned_forward_fisher_yates() {
        for (seed, n, k) in [(1, 0, 3), (1, 5, 0), (2, 10, 3), (3, 10, 9), (4, 10, 10), (5, 4, 9)] {
            let mut a = SplitMix64::new(seed);
            let mut b = SplitMix64::new(seed);
            let mut items: Vec<usize> = (0..n).collect();
            let got = a.partial_shuffle(&mut items, k).to_vec();
            let mut want: Vec<usize> = (0..n).collect();
            for i in 0..k.min(n) {
                let j = i + b.below((n - i) as u64) as usize;
                want.swap(i, j);
            }
            assert_eq!(items, want, "seed {seed}, n {n}, k {k}");
            assert_eq!(got, want[..k.min(n)], "seed {seed}, n {n}, k {k}");
            assert_eq!(a.next_u64(), b.next_u64(), "seed {seed}, n {n}, k {k}: same draws");
            let mut sorted = items.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation");
        }
        let mut pool: Vec<u32> = (0..10).collect();
        assert_eq!(SplitMix64::new(42).partial_shuffle(&mut pool, 4), [7, 2, 4, 5]);
    }

    #[test]
    fn shuffles_are_uniform() {
        // Every order of three elements (and every ordered pair drawn from four) about equally
        // often.
        let mut g = SplitMix64::new(9);
        let mut orders = std::collections::BTreeMap::new();
        let mut pairs = std::collections::BTreeMap::new();
        for _ in 0..60_000 {
            let mut v = [0u8, 1, 2];
            g.shuffle(&mut v);
            *orders.entry(v).or_insert(0u32) += 1;
            let mut w = [0u8, 1, 2, 3];
            let pair = g.partial_shuffle(&mut w, 2).to_vec();
            *pairs.entry(pair).or_insert(0u32) += 1;
        }
        assert_eq!(orders.len(), 6);
        assert!(orders.values().all(|&c| c.abs_diff(10_000) < 500), "{orders:?}");
        assert_eq!(pairs.len(), 12);
        assert!(pairs.values().all(|&c| c.abs_diff(5_000) < 350), "{pairs:?}");
    }

    #[test]
    fn normal_moments_are_plausible() {
        let mut g = SplitMix64::new(7);
        let mut x = vec![0.0; 200_000];
        g.fill_standard_normal(&mut x);
        let mean = x.iter().sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "variance {var}");
    }
}
