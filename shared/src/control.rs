//! Supervisor <-> worker control messages over a Unix stream socketpair.
//!
//! Frames are `u32 LE length | u8 tag | body`; strings inside a body are
//! `u32 LE length | UTF-8`; numbers are LE. The codec is pure (bytes in,
//! messages out) so both ends can run it non-blocking in their event loops.
//! Messages that carry descriptors (`Reload`, `Peers`) say how many; the
//! descriptors travel as SCM_RIGHTS on the frame's first bytes, so a reader
//! has them by the time it decodes the frame ([`ControlChannel`]).

mod channel;
mod codec;

pub use channel::{ControlChannel, MAX_QUEUED_BYTES};
pub use codec::{ControlError, ControlMsg, FrameReader, MAX_FRAME};
