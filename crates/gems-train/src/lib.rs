//! `gems-train`: the only crate that joins model, data and optimizer.
