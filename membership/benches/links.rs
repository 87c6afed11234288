//! Link benchmarks (written next).

fn main() {}
