//! The workspace's seeded generator, re-exported so `gems_subspace::rng::SplitMix64` keeps
//! working for users of this crate alone. Defined in `gems-rng`.

pub use gems_rng::SplitMix64;
