//! The control messages and their framing: `u32 LE length | u8 tag |
//! body`, strings inside a body `u32 LE length | UTF-8`, numbers LE. Pure:
//! bytes in, messages out.

/// No control message comes near this; a larger length means a corrupt stream.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Supervisor -> worker: the config to serve (TOML text and where it came
    /// from, for error messages). Listener sockets were inherited in the
    /// order of the config's listeners.
    Start { origin: String, config: String },
    /// Worker -> supervisor: every listener is registered, serving.
    Ready,
    /// Supervisor -> worker: stop reading clients, exit.
    Stop,
    /// Supervisor -> worker: serve this config from now on; the worker's
    /// socket of each listener, in config order, comes with it (`fds` of them).
    Reload {
        origin: String,
        config: String,
        fds: u32,
    },
    /// Supervisor -> worker: the sending ends of every worker's handoff
    /// inbox, by worker id, come with it (the group was resized).
    Peers { fds: u32 },
    /// Supervisor -> worker: take no new flows; keep serving live sessions
    /// for at most `timeout_ms`, then exit.
    Drain { timeout_ms: u64 },
    /// Worker -> supervisor: a `Reload` is applied.
    Reloaded,
    /// Supervisor -> worker: the answer to `Ready`: the slot is published as
    /// ready (its generation and state are the supervisor's word), so other
    /// workers take its ownership entries as live. Only then does it serve.
    Live,
    /// Supervisor -> worker, during a binary upgrade: stop reading the
    /// listener sockets (the new generation will); the sending end of the
    /// inbox of this slot's successor, generation `generation`, comes with it.
    Quiesce { generation: u64 },
    /// Worker -> supervisor: it reads no listener socket any more.
    Quiesced,
    /// Supervisor -> worker: hand every session, with its upstream sockets,
    /// to the successor named by `Quiesce`.
    HandOver,
    /// Worker -> supervisor: every session is handed over (`left` could not
    /// be: the successor refused them); it waits for `Stop`.
    HandedOver { left: u64 },
    /// Old supervisor -> new supervisor: what the new one inherits (a JSON
    /// object naming the inherited descriptors).
    Inherit { state: String },
    /// New supervisor -> old: its workers stand by, unread listeners; the
    /// sending ends of their inboxes, by slot, come with it (`fds` of them).
    Standby { fds: u32 },
    /// Old supervisor -> new: every old worker has handed over and exited;
    /// their slots are the new generation's.
    Handed,
    /// New supervisor -> old: it serves, and is the service's main process.
    Took,
    /// Supervisor -> a quiesced worker: the upgrade is given up; read the
    /// listeners again and serve on (sessions on offer stay).
    Resume,
    /// Old supervisor -> new, then new supervisor -> its workers: the old
    /// workers read no listener any more; the standby workers read them
    /// from now on (a datagram of a session not yet handed over goes to the
    /// old worker of its slot).
    ReadListeners,
    /// New supervisor -> old: it cannot take over, and why.
    UpgradeFailed { why: String },
}

const TAG_START: u8 = 1;
const TAG_READY: u8 = 2;
const TAG_STOP: u8 = 4;
const TAG_RELOAD: u8 = 5;
const TAG_PEERS: u8 = 6;
const TAG_DRAIN: u8 = 7;
const TAG_RELOADED: u8 = 8;
const TAG_LIVE: u8 = 9;
const TAG_QUIESCE: u8 = 10;
const TAG_QUIESCED: u8 = 11;
const TAG_HAND_OVER: u8 = 12;
const TAG_HANDED_OVER: u8 = 13;
const TAG_INHERIT: u8 = 14;
const TAG_STANDBY: u8 = 15;
const TAG_HANDED: u8 = 16;
const TAG_TOOK: u8 = 17;
const TAG_UPGRADE_FAILED: u8 = 18;
const TAG_READ_LISTENERS: u8 = 19;
const TAG_RESUME: u8 = 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control message announced descriptors that did not arrive")]
    MissingFds,
    #[error("control frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown control message tag {0}")]
    UnknownTag(u8),
    #[error("malformed control message body")]
    BadBody,
}

impl ControlMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let tag = match self {
            ControlMsg::Start { origin, config } => {
                put_str(&mut body, origin);
                put_str(&mut body, config);
                TAG_START
            }
            ControlMsg::Ready => TAG_READY,
            ControlMsg::Stop => TAG_STOP,
            ControlMsg::Reload {
                origin,
                config,
                fds,
            } => {
                put_str(&mut body, origin);
                put_str(&mut body, config);
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_RELOAD
            }
            ControlMsg::Peers { fds } => {
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_PEERS
            }
            ControlMsg::Drain { timeout_ms } => {
                body.extend_from_slice(&timeout_ms.to_le_bytes());
                TAG_DRAIN
            }
            ControlMsg::Reloaded => TAG_RELOADED,
            ControlMsg::Live => TAG_LIVE,
            ControlMsg::Quiesce { generation } => {
                body.extend_from_slice(&generation.to_le_bytes());
                TAG_QUIESCE
            }
            ControlMsg::Quiesced => TAG_QUIESCED,
            ControlMsg::HandOver => TAG_HAND_OVER,
            ControlMsg::HandedOver { left } => {
                body.extend_from_slice(&left.to_le_bytes());
                TAG_HANDED_OVER
            }
            ControlMsg::Inherit { state } => {
                put_str(&mut body, state);
                TAG_INHERIT
            }
            ControlMsg::Standby { fds } => {
                body.extend_from_slice(&fds.to_le_bytes());
                TAG_STANDBY
            }
            ControlMsg::Handed => TAG_HANDED,
            ControlMsg::Took => TAG_TOOK,
            ControlMsg::ReadListeners => TAG_READ_LISTENERS,
            ControlMsg::Resume => TAG_RESUME,
            ControlMsg::UpgradeFailed { why } => {
                put_str(&mut body, why);
                TAG_UPGRADE_FAILED
            }
        };
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        frame.push(tag);
        frame.extend_from_slice(&body);
        frame
    }

    fn decode(tag: u8, mut body: &[u8]) -> Result<ControlMsg, ControlError> {
        let msg = match tag {
            TAG_START => ControlMsg::Start {
                origin: take_str(&mut body)?,
                config: take_str(&mut body)?,
            },
            TAG_READY => ControlMsg::Ready,
            TAG_STOP => ControlMsg::Stop,
            TAG_RELOAD => ControlMsg::Reload {
                origin: take_str(&mut body)?,
                config: take_str(&mut body)?,
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_PEERS => ControlMsg::Peers {
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_DRAIN => ControlMsg::Drain {
                timeout_ms: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_RELOADED => ControlMsg::Reloaded,
            TAG_LIVE => ControlMsg::Live,
            TAG_QUIESCE => ControlMsg::Quiesce {
                generation: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_QUIESCED => ControlMsg::Quiesced,
            TAG_HAND_OVER => ControlMsg::HandOver,
            TAG_HANDED_OVER => ControlMsg::HandedOver {
                left: u64::from_le_bytes(take_array(&mut body)?),
            },
            TAG_INHERIT => ControlMsg::Inherit {
                state: take_str(&mut body)?,
            },
            TAG_STANDBY => ControlMsg::Standby {
                fds: u32::from_le_bytes(take_array(&mut body)?),
            },
            TAG_HANDED => ControlMsg::Handed,
            TAG_TOOK => ControlMsg::Took,
            TAG_READ_LISTENERS => ControlMsg::ReadListeners,
            TAG_RESUME => ControlMsg::Resume,
            TAG_UPGRADE_FAILED => ControlMsg::UpgradeFailed {
                why: take_str(&mut body)?,
            },
            other => return Err(ControlError::UnknownTag(other)),
        };
        if !body.is_empty() {
            return Err(ControlError::BadBody);
        }
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_array<const N: usize>(body: &mut &[u8]) -> Result<[u8; N], ControlError> {
    let bytes: [u8; N] = body
        .get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or(ControlError::BadBody)?;
    *body = &body[N..];
    Ok(bytes)
}

fn take_str(body: &mut &[u8]) -> Result<String, ControlError> {
    let len_bytes: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(ControlError::BadBody)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let bytes = body.get(4..4 + len).ok_or(ControlError::BadBody)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ControlError::BadBody)?;
    *body = &body[4 + len..];
    Ok(s.to_owned())
}

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next_msg(&mut self) -> Option<Result<ControlMsg, ControlError>> {
        let len_bytes: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_FRAME {
            self.buf.clear();
            return Some(Err(ControlError::TooLarge(len)));
        }
        if self.buf.len() < 4 + len {
            return None;
        }
        let msg = ControlMsg::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = [
            ControlMsg::Start {
                origin: "/etc/udpshard/udpshard.toml".into(),
                config: "workers = 2\nname = \"héllo\"\n".into(),
            },
            ControlMsg::Ready,
            ControlMsg::Stop,
            ControlMsg::Reload {
                origin: "f.toml".into(),
                config: "x = 1".into(),
                fds: 3,
            },
            ControlMsg::Peers { fds: 2 },
            ControlMsg::Drain { timeout_ms: 5000 },
            ControlMsg::Reloaded,
            ControlMsg::Live,
            ControlMsg::Quiesce { generation: 7 },
            ControlMsg::Quiesced,
            ControlMsg::HandOver,
            ControlMsg::HandedOver { left: 2 },
            ControlMsg::Inherit {
                state: "{\"protocol\": 1}".into(),
            },
            ControlMsg::Standby { fds: 2 },
            ControlMsg::Handed,
            ControlMsg::Took,
            ControlMsg::ReadListeners,
            ControlMsg::Resume,
            ControlMsg::UpgradeFailed { why: "no".into() },
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        for b in stream {
            reader.push(&[b]);
            while let Some(m) = reader.next_msg() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn rejects_garbage() {
        let mut r = FrameReader::default();
        r.push(&[2, 0, 0, 0, 99, 0]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::UnknownTag(99))));
        r.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.next_msg(), Some(Err(ControlError::TooLarge(_)))));
        r.push(&[3, 0, 0, 0, TAG_START, 9, 9]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::BadBody)));
    }
}
