//! Publishing guarantees: model and manifest change together, locks, temp litter, overflow.
