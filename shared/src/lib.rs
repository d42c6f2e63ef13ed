//! What both udpshard process kinds need: flow keys and the dissectors that
//! extract them, the fleet-stable hash, Maglev and QUIC-LB backend choice,
//! the counters' catalogue, the handoff and control framing (pure), and the
//! few pieces of I/O both sides share: the stats file and the state region
//! (shared memory), the control channel, and the host's counters under
//! /proc.

pub mod backends;
pub mod clock;
pub mod control;
pub mod counter;
pub mod drops;
pub mod flow;
pub mod handoff;
pub mod hash;
pub mod leases;
pub mod maglev;
pub mod owners;
pub mod procnet;
pub mod proxy_v2;
pub mod quic_lb;
pub mod signal;
pub mod state;
pub mod stats;
pub mod steer;

pub use drops::{DropReason, Stage};
pub use flow::{Dissector, FlowKey, Malformed};
pub use hash::stable_hash;
pub use maglev::Maglev;
