//! What both udpshard process kinds need, with no I/O of its own: flow keys and
//! the dissectors that extract them, the fleet-stable hash, Maglev backend
//! choice, the shared-memory stats layout, and the supervisor<->worker control
//! framing.

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
pub mod quic_lb;
pub mod state;
pub mod stats;
pub mod steer;

pub use drops::{DropReason, Stage};
pub use flow::{Dissector, FlowKey, Malformed};
pub use hash::stable_hash;
pub use maglev::Maglev;
