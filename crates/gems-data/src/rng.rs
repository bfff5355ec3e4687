//! The workspace's seeded generator (defined once, in `gems-rng`), so prepared datasets stay
//! byte-identical for a seed across releases.

pub use gems_rng::SplitMix64;
