//! Test support for udpshard: the load generator core and the end-to-end harness.

pub mod harness;
pub mod load;
