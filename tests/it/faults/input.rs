//! Hostile input: names, headers, pickles, strides, FIFOs, symlinks, control characters.
